"""Edge ablation and edge-level faithfulness on one segment u -> d of a CLIP image tower (MIB-style).

Ablating an edge (u, i) -> (d, j) recomputes d with u's node i (channel, or residual dim) replaced by
its ablation value and keeps only output j of that recomputation; every other node of d keeps the
value computed from the clean u unless its own edges are ablated. A circuit C is a set of kept
edges; every edge of the segment outside C is ablated, all at once, the rest of the tower clean.
f(C) = (m(C) - m(empty)) / (m(N) - m(empty)) for the true-class logit m; CPR = area under f and
CMD = area under |1 - f| over the fractions of edges kept in `EDGE_FRACTIONS` (x in [0, 1], linear,
trapezoid rule from (0, 0); the engine's `curve_areas`).

Ablation values (`Segment.build`): 'zero'; 'mean' over reference images; 'resample' and
'counterfactual' take image b's values from donor b (resample: a random image; counterfactual:
another class's image of the same domain; the caller picks the donors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from clipmech.analysis.engine_adapter import (Metric, cache_points, check_points, curve_areas, evaluate_metric, node_dim,
                                              segment_fn)

ABLATIONS = ("zero", "mean", "resample", "counterfactual")
EDGE_FRACTIONS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)  # % of the segment's edges kept
FAITHFULNESS_EPS = 1e-6  # |m(N) - m(empty)| below this: f is undefined and the curve is skipped
ROW_CHUNK = 64  # downstream rows recomputed per segment run (each one a copy of the batch)


@dataclass
class Segment:
    """Segment u -> d of `model` on `images` with node-last clean values `u` [B, ..., I] and `d`
    [B, ..., J], their ablation values `u0`, `d0` (broadcastable), the input-space counterpart of
    the ablation `baseline_images` (zeros, the reference mean image, the donors), the metric on the
    unnormalised embedding, and the (head, labels) the paper's IG needs. Build with `Segment.build`."""

    model: object
    images: Tensor
    upstream: str
    downstream: str
    metric: Metric
    head: Tensor
    labels: Tensor
    ablation: str
    u: Tensor
    d: Tensor
    u0: Tensor
    d0: Tensor
    baseline_images: Tensor

    @classmethod
    def build(cls, model, images: Tensor, upstream: str, downstream: str, head: Tensor, labels: Tensor,
              metric: Metric, ablation: str = "zero", reference: Tensor | None = None,
              donors: Tensor | None = None, fill: Mapping[str, Tensor] | None = None) -> "Segment":
        """Cache the clean values and the ablation values (module docstring). `reference`: images
        for 'mean' (default `images`); `fill`: their mean node values {point: [..., C]} already
        computed (`ablation.ablation_values`), which saves the reference forward when many
        segments share one reference; `donors`: one image per image for 'resample' /
        'counterfactual'. Cost: one or two forwards up to `downstream`."""
        check_points(model, [upstream, downstream])
        order = list(model.hook_names())
        if order.index(upstream) >= order.index(downstream):
            raise ValueError(f"upstream {upstream!r} must come before downstream {downstream!r}")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        u, d = (_node_last(p, a) for p, a in cache_points(model, images, [upstream, downstream]).items())
        if ablation == "zero":
            u0, d0, x0 = torch.zeros_like(u[:1]), torch.zeros_like(d[:1]), torch.zeros_like(images)
        elif ablation == "mean":
            reference = images if reference is None else reference
            if fill is None:
                ref = cache_points(model, reference, [upstream, downstream])
                u0, d0 = (_node_last(p, a).mean(0, keepdim=True) for p, a in ref.items())
            else:
                u0, d0 = fill[upstream][None], fill[downstream][None]
            x0 = reference.mean(0, keepdim=True).expand_as(images)
        else:
            if donors is None or donors.shape != images.shape:
                raise ValueError(f"ablation {ablation!r} needs donor images of the same shape as the images "
                                 f"{tuple(images.shape)}, one per image")
            u0, d0 = (_node_last(p, a) for p, a in cache_points(model, donors, [upstream, downstream]).items())
            x0 = donors
        return cls(model, images, upstream, downstream, metric, head, labels, ablation, u, d, u0, d0, x0)

    def forward(self, u: Tensor) -> Tensor:
        """d [k*B, ..., J] for node-last upstream values `u` [k*B, ..., I] (k stacked copies)."""
        run = segment_fn(self.model, self.upstream, self.images, stop_at=self.downstream)
        act = run(_node_first(self.upstream, u).contiguous())
        return _node_last(self.downstream, act)

    def value(self, d: Tensor) -> Tensor:
        """metric of the run with node-last downstream values `d` [B, ..., J] (scalar tensor)."""
        run = segment_fn(self.model, self.downstream, self.images)
        return evaluate_metric(self.metric, run(_node_first(self.downstream, d).contiguous()))

    def values(self, d: Tensor) -> Tensor:
        """[k]: the metric of each of k stacked copies of downstream values [k*B, ..., J]."""
        run = segment_fn(self.model, self.downstream, self.images)
        emb = run(_node_first(self.downstream, d).contiguous()).unflatten(0, (-1, len(self.images)))
        return torch.stack([evaluate_metric(self.metric, e) for e in emb])

    @property
    def shape(self) -> tuple[int, int]:
        """(J, I): downstream and upstream node counts."""
        return self.d.shape[-1], self.u.shape[-1]


def _node_last(point: str, act: Tensor) -> Tensor:
    return act.movedim(node_dim(point, act.ndim), -1)


def _node_first(point: str, act: Tensor) -> Tensor:
    return act.movedim(-1, node_dim(point, act.ndim))


def _stack(x: Tensor, k: int) -> Tensor:
    return x.repeat(k, *([1] * (x.ndim - 1)))


@torch.no_grad()
def edge_ablated_value(seg: Segment, keep: Tensor) -> float:
    """The metric with every edge outside `keep` (bool [J, I]) ablated (module docstring). Rows with
    every edge kept keep the clean d_j, rows with none take d_j of the fully ablated u; each other
    row j needs its own segment run, `ROW_CHUNK` rows per batch. Cost: 1 + ceil(partial rows / 64)
    segment runs over 64 copies of the batch, plus one readout."""
    n_down, n_up = seg.shape
    if keep.shape != (n_down, n_up):
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected (J, I) = ({n_down}, {n_up})")
    keep = keep.to(seg.u.device)
    d = seg.d.clone()
    none = ~keep.any(1)
    if none.any():
        d[..., none] = seg.forward(seg.u0.expand_as(seg.u).contiguous())[..., none]
    partial = torch.nonzero(keep.any(1) & ~keep.all(1)).flatten()
    n = len(seg.images)
    for start in range(0, len(partial), ROW_CHUNK):
        rows = partial[start:start + ROW_CHUNK]
        mask = keep[rows].view(len(rows), *([1] * (seg.u.ndim - 1)), n_up)
        mixed = torch.where(mask, seg.u[None], seg.u0[None])
        out = seg.forward(mixed.flatten(0, 1)).unflatten(0, (len(rows), n))
        d[..., rows] = torch.stack([out[r, ..., j] for r, j in enumerate(rows.tolist())], -1)
    return float(seg.value(d))


def top_edges(scores: Tensor, fraction_percent: float) -> Tensor:
    """bool [J, I]: the top ceil(p/100 * J * I) edges by score (ties by lower flat index)."""
    k = math.ceil(fraction_percent / 100 * scores.numel() - 1e-9)
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.flatten().double().nan_to_num(neginf=-1e300), descending=True, stable=True)[:k]] = True
    return keep.view(scores.shape)


def edge_faithfulness_curve(seg: Segment, scores: Tensor, fractions: Sequence[float] = EDGE_FRACTIONS,
                            eps: float = FAITHFULNESS_EPS) -> dict:
    """f at each fraction of edges kept (top by `scores` [J, I]), CPR ("cpr", area under f) and CMD
    ("cmd", area under |1 - f|); f, cpr and cmd None with a "skipped" reason when |m(N) - m(empty)| <
    `eps`. Cost: len(fractions) + 1 calls of `edge_ablated_value`."""
    n_down, n_up = seg.shape
    m_empty = edge_ablated_value(seg, torch.zeros(n_down, n_up, dtype=torch.bool))
    with torch.no_grad():
        m_full = float(seg.value(seg.d))
    out = {"fractions": list(fractions), "m_full": m_full, "m_empty": m_empty, "f": None, "cpr": None, "cmd": None}
    if abs(m_full - m_empty) < eps:
        out["skipped"] = f"|m(N) - m(empty)| = {abs(m_full - m_empty):.2g} < eps = {eps:g}"
        return out
    values = [edge_ablated_value(seg, top_edges(scores, p)) for p in fractions]
    out["f"] = [(v - m_empty) / (m_full - m_empty) for v in values]
    areas = curve_areas(fractions, out["f"])
    return out | {"cpr": areas["auc"], "cmd": areas["distance"]}
