"""Ablating circuit nodes and what it shows: ablation values (the `ABLATIONS` vocabulary: zero,
mean, resample), the embedding with nodes ablated, faithfulness and completeness of a circuit,
across domains and over circuit sizes (MIB-style curves and their areas).

Every function takes a `HookedCLIP`, images and a `Circuit` (or keep masks) and returns tensors
or small dicts; the metric defaults to the mean true-class cosine logit.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from clipmech.analysis.attribution import ABLATIONS, NodeSpace, check_points, node_spaces
from clipmech.analysis.circuit import Circuit
from clipmech.analysis.metrics import Metric, evaluate_metric, true_class_logit


def ablation_values(model, reference: Tensor, points: Sequence[str], ablation: str = "mean",
                    saes: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """{point: node values} that ablated nodes take: zeros ('zero') or the mean over the
    `reference` images ('mean'), both [..., C] of one example; or, for 'resample', the values of
    the `reference` images themselves [B, ..., C] (donor b for image b, e.g. a same-domain drawing
    of another class). Cost: one forward over `reference`."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    spaces = node_spaces(model, reference, list(points), saes)
    if ablation == "resample":
        return {p: s.clean for p, s in spaces.items()}
    return {p: s.clean.mean(0) if ablation == "mean" else torch.zeros_like(s.clean[0]) for p, s in spaces.items()}


def ablated_embedding(model, images: Tensor, keep: Mapping[str, Tensor], *, ablation: str = "mean",
                      reference: Tensor | None = None, saes: Mapping[str, Any] | None = None,
                      fill: Mapping[str, Tensor] | None = None) -> Tensor:
    """Unnormalised embeddings [B, D] with, at every point of `keep` ({point: bool [C]}), the nodes
    where keep is False replaced by zero ('zero'), by their mean over `reference` images ('mean',
    default reference = `images`) or by the values of paired donor images `reference`
    ('resample'); `fill` (from `ablation_values`) skips recomputing those values. All points are
    ablated in the same forward pass."""
    points = list(keep)
    check_points(model, points)
    saes = dict(saes or {})
    if fill is None and ablation == "resample" and reference is None:
        raise ValueError("ablation 'resample' needs the donor images: reference=<one donor per image>")
    if fill is None:
        fill = ablation_values(model, images if reference is None else reference, points, ablation, saes)
    return ablated_embeddings(model, images, {p: m[None] for p, m in keep.items()}, fill, saes=saes)[0]


def ablated_embeddings(model, images: Tensor, keep: Mapping[str, Tensor], fill: Mapping[str, Tensor],
                       batch: int = 256, saes: Mapping[str, Any] | None = None) -> Tensor:
    """Unnormalised embeddings [S, B, D] of `images` under S ablations at once: at every point p of
    `keep` ({p: bool [S, C]}), setting s keeps the nodes where keep[p][s] is True and replaces the
    rest by `fill[p]` (one example [..., C], mean or zero ablation; or one donor per image
    [B, ..., C], resample ablation; `ablation_values`); `saes` {p: sae} makes p's nodes SAE latents.
    Why batched: the study's cells hold one or two images, so one forward per setting is mostly
    per-call overhead; the settings are stacked into forwards of about `batch` images. Cost: S * B
    image forwards."""
    points = list(keep)
    check_points(model, points)
    saes = dict(saes or {})
    n_set = {len(m) for m in keep.values()}
    if len(n_set) != 1:
        raise ValueError(f"keep masks of every point need the same number of settings; got {sorted(n_set)}")
    n_set_, n_img = n_set.pop(), len(images)
    per = max(1, batch // max(1, n_img))
    out = []
    for start in range(0, n_set_, per):
        chunk = {p: m[start:start + per].repeat_interleave(n_img, 0) for p, m in keep.items()}  # setting-major
        reps = len(next(iter(chunk.values()))) // n_img

        def hook(t: Tensor, hook) -> Tensor:
            space = NodeSpace(hook.name, t.detach(), saes.get(hook.name))
            nodes = space.nodes(t)
            if keep[hook.name].shape[1:] != (space.n_nodes,):
                raise ValueError(f"keep mask for {hook.name!r} has shape {tuple(keep[hook.name].shape[1:])}, "
                                 f"expected ({space.n_nodes},)")
            mask = chunk[hook.name].to(t.device).view(len(t), *([1] * (nodes.ndim - 2)), nodes.shape[-1])
            f = fill[hook.name].to(t)
            if f.ndim == nodes.ndim:  # one donor per image: tile over the settings of the chunk
                f = f.repeat(reps, *([1] * (f.ndim - 1)))
            return space.activation(torch.where(mask, nodes, f))

        embed: list[Tensor] = []
        with torch.no_grad():
            model.run_with_hooks(image=images.repeat(reps, *([1] * (images.ndim - 1))),
                                 fwd_hooks=[(p, hook) for p in points] +
                                 [("hook_image_embed", lambda t, hook: embed.append(t))])
        out.append(embed[-1].view(reps, n_img, -1))
    return torch.cat(out, 0)


def _metric_values(model, circuit: Circuit, images: Tensor, metric: Metric, ablation: str,
                   reference: Tensor | None, saes, points: Sequence[str] | None = None,
                   fill: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    points = list(circuit.points) if points is None else list(points)
    unknown = [p for p in points if p not in circuit.points]
    if unknown:
        raise ValueError(f"points {unknown} are not points of the circuit; its points: {circuit.points}")
    keep = {p: m for p, m in circuit.keep_masks().items() if p in points}
    full = {p: torch.ones_like(m) for p, m in keep.items()}
    runs = {"full": full, "empty": {p: ~m for p, m in full.items()}, "circuit": keep,
            "complement": {p: ~m for p, m in keep.items()}}
    if fill is None:
        fill = ablation_values(model, images if reference is None else reference, points, ablation, saes)
    out = {}
    for name, masks in runs.items():
        emb = ablated_embedding(model, images, masks, saes=saes, fill=fill)
        out[name] = float(evaluate_metric(metric, emb))
    if abs(out["full"] - out["empty"]) < 1e-12:
        raise ValueError(f"faithfulness undefined: the metric is the same with all nodes ablated and none "
                         f"({out['full']:.4g}); use another metric or ablation")
    return out


def faithfulness(model, circuit: Circuit, images: Tensor, labels: Tensor, head: Tensor, *, ablation: str = "mean",
                 reference: Tensor | None = None, metric: Metric | None = None,
                 saes: Mapping[str, Any] | None = None, points: Sequence[str] | None = None,
                 fill: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Faithfulness (M(circuit) - M(empty)) / (M(full) - M(empty)), everything outside the circuit
    ablated at all its points at once, and completeness (M(full) - M(complement)) / (M(full) -
    M(empty)): the share of the gap lost when only the circuit is ablated. M defaults to the mean
    true-class logit. `points` ablates only at those circuit points (default: all; one point shows
    what the circuit keeps there without ablations compounding across points); `fill` (from
    `ablation_values` over the reference) skips recomputing the ablation values. Returns both plus
    the raw metric values. Cost: 4 forwards (+1 for the mean unless `fill` is given)."""
    metric = metric or true_class_logit(head, labels)
    m = _metric_values(model, circuit, images, metric, ablation, reference, saes, points, fill)
    gap = m["full"] - m["empty"]
    return {"faithfulness": (m["circuit"] - m["empty"]) / gap, "completeness": (m["full"] - m["complement"]) / gap,
            **{f"metric_{k}": v for k, v in m.items()}}


def cross_domain_faithfulness(model, circuits: Mapping[str, Circuit], images: Mapping[str, Tensor],
                              labels: Mapping[str, Tensor], head: Tensor, *, ablation: str = "mean",
                              reference: Mapping[str, Tensor] | None = None,
                              fill: Mapping[str, Mapping[str, Tensor]] | None = None) -> tuple[list[str], np.ndarray]:
    """F[a, b] = faithfulness of the circuit found on domain a, evaluated on domain b's images, mean
    ablation over `reference[b]` (e.g. test images of all classes of domain b; default b's images,
    which for a one-class batch makes mean ablation nearly a no-op). `circuits`, `images`,
    `labels`, `reference` are keyed by domain (one class). The ablation values are computed once
    per domain b, or taken from `fill[b]` (`ablation_values` over the circuits' points) when given."""
    domains = [d for d in circuits if d in images]
    if not domains:
        raise ValueError("no domain has both a circuit and images")
    points = list(dict.fromkeys(p for d in domains for p in circuits[d].points))
    if fill is None:
        fill = {b: ablation_values(model, images[b] if reference is None else reference[b], points, ablation)
                for b in domains}
    mat = np.zeros((len(domains), len(domains)))
    for i, a in enumerate(domains):
        for j, b in enumerate(domains):
            mat[i, j] = faithfulness(model, circuits[a], images[b], labels[b], head, ablation=ablation,
                                     fill=fill[b])["faithfulness"]
    return domains, mat


def faithfulness_across_domains(model, circuits: Mapping[str, Mapping[str, Circuit]],
                                samples: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]], head: Tensor,
                                fill: Mapping[str, Mapping[str, Tensor]], domains: Sequence[str],
                                points: Sequence[str], ablation: str = "mean") -> dict[str, Any]:
    """Cross-domain faithfulness of every class's circuits and their faithfulness one point at a time.
    `circuits` {domain: {class: Circuit}}, `samples` {class: {domain: (images, labels)}}, `fill`
    {domain: ablation values} (`ablation_values`, one reference forward per domain).
    Returns {"per_class": {class: {"domains", "matrix" (`cross_domain_faithfulness`), "per_point":
    {domain: {point: f with ablation at that point only, None where undefined}}}}, "mean": [D, D]
    over classes, "per_point_mean": [D, P], "domains", "points", "ablation"}. Cost per class:
    D^2 + D x P `faithfulness` calls."""
    per_class = {}
    for k, own in samples.items():
        have = [d for d in domains if k in circuits[d] and d in own]
        if not have:
            continue
        names, mat = cross_domain_faithfulness(model, {d: circuits[d][k] for d in have},
                                               {d: own[d][0] for d in have}, {d: own[d][1] for d in have}, head,
                                               ablation=ablation, fill=fill)
        per_class[k] = {"domains": names, "matrix": mat.tolist(), "per_point": {
            d: {p: _point_faithfulness(model, circuits[d][k], own[d], head, fill[d], ablation, p) for p in points}
            for d in have}}
    full = np.full((len(domains), len(domains)), np.nan)
    for i, a in enumerate(domains):
        for j, b in enumerate(domains):
            vals = [f["matrix"][f["domains"].index(a)][f["domains"].index(b)] for f in per_class.values()
                    if a in f["domains"] and b in f["domains"]]
            full[i, j] = np.mean(vals) if vals else np.nan
    per_point = np.array([[np.nanmean([np.nan if f["per_point"].get(d, {}).get(p) is None else f["per_point"][d][p]
                                       for f in per_class.values()] or [np.nan]) for p in points] for d in domains])
    return {"per_class": per_class, "mean": full.tolist(), "domains": list(domains), "ablation": ablation,
            "points": list(points), "per_point_mean": per_point.tolist(),
            "note": "per_point: a domain's own circuit on its own images, ablated at that point only"}


def _point_faithfulness(model, circuit: Circuit, sample: tuple[Tensor, Tensor], head: Tensor,
                        fill: Mapping[str, Tensor], ablation: str, point: str) -> float | None:
    """Faithfulness of `circuit` on `sample` with ablation at `point` only; None where undefined
    (ablating every node there leaves the metric unchanged)."""
    try:
        return faithfulness(model, circuit, *sample, head, ablation=ablation, fill=fill, points=[point])["faithfulness"]
    except ValueError:
        return None


# ------------------------------------------------------------------- faithfulness over circuit sizes
FAITHFULNESS_SIZES = (1, 2, 5, 10, 20, 50, 100)  # % of nodes kept per point (MIB-style sweep)
FAITHFULNESS_EPS = 1e-3  # |m(N) - m(empty)| below this: f undefined, the cell is skipped and counted


@torch.no_grad()
def resample_values(model, donors: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
    """`ablation_values(model, donors, points, "resample")`: {point: node values [B, ..., C]}, image
    b's ablated nodes take donor b's values. Cost: one forward over `donors`."""
    return ablation_values(model, donors, points, "resample")


def top_fraction_masks(circuit: Circuit, percent: float, points: Sequence[str]) -> dict[str, Tensor]:
    """{point: bool [C]} keeping the top ceil(percent/100 * C) nodes of each point by the circuit's node
    scores (ties by lower index); percent = 100 keeps every node."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    out = {}
    for p in points:
        s = circuit.node_scores[p]
        keep = torch.zeros(len(s), dtype=torch.bool)
        keep[torch.argsort(s, descending=True, stable=True)[:math.ceil(percent / 100 * len(s) - 1e-9)]] = True
        out[p] = keep
    return out


def curve_areas(percents: Sequence[float], f: Sequence[float]) -> dict[str, float]:
    """Areas under a faithfulness curve on a linear x axis in [0, 1] (x = percent / 100), trapezoid
    rule, starting at (0, 0): "auc" = area under f (circuit performance ratio, 1 for a perfect
    circuit at every size) and "distance" = area under |1 - f| (circuit-model distance)."""
    x = np.concatenate([[0.0], np.asarray(percents, dtype=float) / 100])
    y = np.concatenate([[0.0], np.asarray(f, dtype=float)])
    if np.any(np.diff(x) <= 0) or x[-1] > 1:
        raise ValueError(f"percents must increase within (0, 100]; got {list(percents)}")
    return {"auc": float(np.trapezoid(y, x)), "distance": float(np.trapezoid(np.abs(1 - y), x))}


def faithfulness_curve(model, circuit: Circuit, images: Tensor, labels: Tensor, head: Tensor, *,
                       fill: Mapping[str, Tensor], points: Sequence[str] | None = None,
                       sizes: Sequence[float] = FAITHFULNESS_SIZES, eps: float = FAITHFULNESS_EPS,
                       metric: Metric | None = None) -> dict[str, Any]:
    """f(x) = (m(C_x) - m(empty)) / (m(N) - m(empty)) for the circuit's top x % nodes per point (x in
    `sizes`), everything else at every point replaced by `fill` (from `ablation_values` with any
    of the `ABLATIONS`); m = `metric`, default the mean true-class cosine logit of `images` (held
    out from discovery). `points` default to the circuit's points except the pixel input. Returns
    {"sizes", "f", "auc", "distance", "m_full", "m_empty"}, with f and the areas None and a "skipped"
    reason when |m(N) - m(empty)| < eps. Cost: (len(sizes) + 2) * len(images) image forwards, batched
    (`ablated_embeddings`)."""
    points = [p for p in circuit.points if not p.endswith("hook_input")] if points is None else list(points)
    metric = metric or true_class_logit(head, labels)
    full = {p: torch.ones(len(circuit.node_scores[p]), dtype=torch.bool) for p in points}
    settings = [{p: ~k for p, k in full.items()}, full] + [top_fraction_masks(circuit, x, points) for x in sizes]
    emb = ablated_embeddings(model, images, {p: torch.stack([s[p] for s in settings]) for p in points}, fill)
    m_empty, m_all, *kept = (float(evaluate_metric(metric, e)) for e in emb)
    values = dict(zip(sizes, kept))
    m_full = values[100] if 100 in values else m_all
    out: dict[str, Any] = {"sizes": list(sizes), "m_full": m_full, "m_empty": m_empty, "f": None, "auc": None,
                           "distance": None}
    if abs(m_full - m_empty) < eps:
        out["skipped"] = f"|m(N) - m(empty)| = {abs(m_full - m_empty):.2g} < eps = {eps:g}"
        return out
    out["f"] = [(values[x] - m_empty) / (m_full - m_empty) for x in sizes]
    return out | curve_areas(sizes, out["f"])

