"""Causal node analyses of CLIP's image tower: exact activation patching and attribution patching
on any hook point of a `HookedCLIP` (conventions: `clipmech.analysis.attribution`).

Every patching result is an *effect*: metric(patched run) - metric(unpatched run), one value per
patched unit. Only the segment from the patched point to the embedding is rerun
(`HookedCLIP.forward_from`); our own code because TransformerLens's patching helpers assume its
transformer classes.

The metrics, the point helpers and integrated gradients that lived here are re-exported from
`clipmech.analysis.metrics` and `clipmech.analysis.attribution` for one release.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from clipmech.analysis.attribution import (ABLATIONS, RIEMANN_RULE, Granularity, n_units, unit_sum,  # noqa: F401
                                           cache_points, check_points, check_same_shape, integrated_gradients,
                                           mean_gradient_along_path, node_dim, node_sum, replacement,
                                           riemann_alphas, segment_fn)
from clipmech.analysis.metrics import (Metric, contrastive_loss, correct_class_probability,  # noqa: F401
                                       cosine_logits, evaluate_metric, image_text_similarity, logit_difference,
                                       true_class_logit)
from clipmech.utils import warn_renamed


def _unit_masks(shape: torch.Size, point: str, granularity: Granularity, units: Sequence[int]) -> Tensor:
    """Bool [len(units), *shape[1:]]: which elements of one example each unit covers."""
    masks = torch.zeros(len(units), *shape[1:], dtype=torch.bool)
    d = node_dim(point, len(shape))
    for r, u in enumerate(units):
        if granularity == "point":
            masks[r] = True
        elif granularity in ("channel", "head"):
            masks[r].select(d - 1, u).fill_(True)
        elif d == 1 and len(shape) == 4:  # conv map positions: flattened (H, W)
            masks[r].view(shape[1], -1)[:, u] = True
        else:  # token positions
            masks[r, u] = True
    return masks


def activation_patch(model, images: Tensor, metric: Metric, point: str, *,
                     granularity: Granularity = "channel", ablation: str = "zero", source: Tensor | None = None,
                     reference: Tensor | None = None, units: Sequence[int] | None = None,
                     batch_units: int = 16, seed: int = 0, mode: str | None = None) -> Tensor:
    """Exact patching: for each unit (whole point, channel, position or head) of `point`, replace its
    values in the run on `images` by those `ablation` gives (see `replacement` for
    `ablation`/`source`/`reference`; `mode=` is its deprecated name) and rerun the segment point ->
    embedding. Returns Tensor[len(units)] of metric(patched) - metric(clean).

    Cost: one forward of the segment per unit, `batch_units` units stacked into one batch.
    """
    if mode is not None:
        warn_renamed("activation_patch(mode=...)", "ablation=...")
        ablation = mode
    check_points(model, [point])
    clean = cache_points(model, images, [point])[point]
    repl = replacement(model, images, point, ablation, source=source, reference=reference, seed=seed)
    n = n_units(clean.shape, point, granularity)
    units = list(range(n)) if units is None else [int(u) for u in units]
    bad = [u for u in units if not 0 <= u < n]
    if bad:
        raise ValueError(f"units {bad[:3]} out of range for {n} {granularity} units of {point!r}")
    run = segment_fn(model, point, images)
    with torch.no_grad():
        base = evaluate_metric(metric, run(clean))
        effects = []
        for start in range(0, len(units), batch_units):
            chunk = units[start:start + batch_units]
            masks = _unit_masks(clean.shape, point, granularity, chunk).to(clean.device)
            patched = torch.where(masks[:, None], repl[None], clean[None])  # [U, B, ...]
            emb = run(patched.flatten(0, 1)).unflatten(0, (len(chunk), len(images)))
            effects += [evaluate_metric(metric, e) - base for e in emb]
    return torch.stack(effects) if effects else clean.new_zeros(0)


# ----------------------------------------------------------------------------- attribution patching
def attribution_patch(model, clean: Tensor, corrupt: Tensor, metric: Metric, points: Sequence[str] | None = None,
                      granularity: Granularity = "channel") -> dict[str, Tensor]:
    """First-order estimate, for every unit of every point, of patching the clean activation into
    the corrupt run: (a_clean - a_corrupt) . dmetric/da at the corrupt run. Approximates
    `activation_patch(model, corrupt, metric, p, ablation="resample", source=clean)`.

    Returns {point: Tensor[n_units]}. Cost: 2 forwards + 1 backward for all points together.
    """
    check_same_shape(clean, corrupt, "clean images", "corrupt images")
    points = list(model.analysis_points() if points is None else points)
    check_points(model, points)
    clean_acts = cache_points(model, clean, points)
    corrupt_acts: dict[str, Tensor] = {}

    def keep(t: Tensor, hook) -> None:
        corrupt_acts[hook.name] = t

    embed: list[Tensor] = []
    hooks = [(p, keep) for p in points] + [("hook_image_embed", lambda t, hook: embed.append(t))]
    with torch.enable_grad():
        # The input must require grad so that every point (including the pixels) is in the graph.
        model.run_with_hooks(image=corrupt.detach().clone().requires_grad_(True), fwd_hooks=hooks)
        value = evaluate_metric(metric, embed[-1])
        grads = torch.autograd.grad(value, [corrupt_acts[p] for p in points], allow_unused=True)
    out = {}
    for p, g in zip(points, grads):
        g = torch.zeros_like(corrupt_acts[p]) if g is None else g
        out[p] = unit_sum((clean_acts[p] - corrupt_acts[p].detach()) * g, p, granularity).detach()
    return out


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties get average ranks)."""
    from scipy.stats import spearmanr

    x, y = x.detach().flatten().double().cpu().numpy(), y.detach().flatten().double().cpu().numpy()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two equally long vectors of >= 2 values, got {len(x)} and {len(y)}")
    rho = spearmanr(x, y).statistic
    if math.isnan(rho):
        raise ValueError("Spearman correlation undefined: one of the vectors is constant")
    return float(rho)


def patching_agreement(model, receiver: Tensor, source: Tensor, labels: Tensor, head: Tensor,
                       points: Sequence[str], steps: int = 10) -> tuple[dict[str, dict[str, float | None]],
                                                                      dict[str, dict[str, Tensor]]]:
    """How well attribution patching and IG estimate exact activation patching, per point, for
    `source` activations patched into `receiver` images (same length, true-class logit of `labels`
    under `head`). Returns ({point: {"spearman_attribution_vs_exact", "spearman_ig_vs_exact"}: rank
    correlation, None where a vector is constant}, {point: {"exact", "attribution", "ig": [units]}}).
    IG is the negated corrupt-baseline IG, so all three estimate the same effect. Cost per point:
    one patched run per unit (batched 64 at a time) + `steps` gradient passes; attribution
    patching one forward + backward in all."""
    metric = true_class_logit(head, labels)
    attr = attribution_patch(model, source, receiver, metric, points)
    rows, values = {}, {}
    for p in points:
        exact = activation_patch(model, receiver, metric, p, ablation="resample", source=source, batch_units=64)
        ig = -integrated_gradients(model, receiver, metric, p, ablation="resample", source=source, steps=steps,
                                   rule="midpoint")
        rows[p] = {}
        for name, est in (("attribution", attr[p]), ("ig", ig)):
            try:
                rows[p][f"spearman_{name}_vs_exact"] = spearman(est, exact)
            except ValueError:  # constant vectors (e.g. all-dead channels): None, counted by the caller
                rows[p][f"spearman_{name}_vs_exact"] = None
        values[p] = {"exact": exact, "attribution": attr[p], "ig": ig}
    return rows, values
