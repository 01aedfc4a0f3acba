"""Causal node analyses of CLIP's image tower: CLIP-native metrics, exact activation patching,
attribution patching and integrated gradients (IG) on any hook point of a `HookedCLIP`.

Conventions
- A *metric* maps the unnormalised image embedding [B, D] to a scalar tensor (reduce over the batch
  inside the metric). The factories below build the CLIP-native ones.
- A *node* of a point is one slice along its node axis (`node_dim`): channels of a conv map
  [B, C, H, W], the last dimension of token streams [B, T, D] and vectors [B, D], heads of per-head
  tensors [B, T, H, d_head]. Positions are the spatial / token positions.
- Every patching result is an *effect*: metric(patched run) - metric(unpatched run), one value per
  patched unit.

Only the segment from the patched point to the embedding is rerun (`HookedCLIP.forward_from`).
Exact patching and the IG Riemann sums are our own code because captum's layer methods rerun the
whole model per step and TransformerLens' patching helpers assume its transformer classes; captum's
`LayerIntegratedGradients` is the reference our IG is tested against.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clipmech.utils import unknown_name_error

Metric = Callable[[Tensor], Tensor]
Granularity = Literal["point", "channel", "position", "head"]
_HEAD_SUFFIXES = ("hook_q", "hook_k", "hook_v", "hook_z")


# --------------------------------------------------------------------------------------- metrics
def cosine_logits(embedding: Tensor, head: Tensor) -> Tensor:
    """[B, K] cosine of each L2-normalised image embedding [B, D] with each row of `head` [K, D]
    (no logit scale), i.e. the zero-shot logits the paper's circuits use."""
    if embedding.shape[-1] != head.shape[-1]:
        raise ValueError(f"embedding dim {embedding.shape[-1]} != zero-shot head dim {head.shape[-1]}; "
                         "build the head with model.zero_shot_head(...) of the same model")
    return F.normalize(embedding, dim=-1) @ F.normalize(head.to(embedding), dim=-1).T


def _labels(labels: Tensor | Sequence[int], embedding: Tensor) -> Tensor:
    labels = torch.as_tensor(labels, device=embedding.device).long()
    if labels.shape != embedding.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the batch of {embedding.shape[0]} images")
    return labels


def true_class_logit(head: Tensor, labels: Tensor | Sequence[int], reduce: str = "mean") -> Metric:
    """Metric: cosine logit of each image's true class (`reduce` = 'mean' or 'sum' over the batch)."""
    def metric(embedding: Tensor) -> Tensor:
        logits = cosine_logits(embedding, head)
        picked = logits.gather(1, _labels(labels, embedding)[:, None])[:, 0]
        return _reduce(picked, reduce)
    return metric


def logit_difference(head: Tensor, labels: Tensor | Sequence[int], other: Tensor | Sequence[int] | int,
                     reduce: str = "mean") -> Metric:
    """Metric: cosine logit of `labels` minus that of `other` (an int or one class per image)."""
    def metric(embedding: Tensor) -> Tensor:
        logits = cosine_logits(embedding, head)
        lab = _labels(labels, embedding)
        oth = torch.as_tensor(other, device=embedding.device).long().expand_as(lab)
        return _reduce(logits.gather(1, lab[:, None])[:, 0] - logits.gather(1, oth[:, None])[:, 0], reduce)
    return metric


def class_contrastive_logit(head: Tensor, labels: Tensor | Sequence[int], reduce: str = "mean") -> Metric:
    """Metric: cosine logit of each image's true class minus the mean of its other classes' logits
    (a circuit for this metric is specific to the class, not to "any image of this kind")."""
    def metric(embedding: Tensor) -> Tensor:
        logits = cosine_logits(embedding, head)
        true = logits.gather(1, _labels(labels, embedding)[:, None])[:, 0]
        others = (logits.sum(1) - true) / max(1, logits.shape[1] - 1)
        return _reduce(true - others, reduce)
    return metric


def correct_class_probability(head: Tensor, labels: Tensor | Sequence[int], logit_scale: float = 100.0,
                              reduce: str = "mean") -> Metric:
    """Metric: softmax(logit_scale * cosine logits) at the true class (pass the model's
    `logit_scale.exp()` for the probabilities it was trained with)."""
    def metric(embedding: Tensor) -> Tensor:
        probs = (logit_scale * cosine_logits(embedding, head)).softmax(-1)
        return _reduce(probs.gather(1, _labels(labels, embedding)[:, None])[:, 0], reduce)
    return metric


def image_text_similarity(text_embeddings: Tensor, reduce: str = "mean") -> Metric:
    """Metric: cosine similarity of image b with its paired text embedding `text_embeddings[b]`."""
    def metric(embedding: Tensor) -> Tensor:
        if text_embeddings.shape != embedding.shape:
            raise ValueError(f"text embeddings {tuple(text_embeddings.shape)} must pair one-to-one with "
                             f"image embeddings {tuple(embedding.shape)}")
        sims = (F.normalize(embedding, dim=-1) * F.normalize(text_embeddings.to(embedding), dim=-1)).sum(-1)
        return _reduce(sims, reduce)
    return metric


def contrastive_loss(text_embeddings: Tensor, logit_scale: float = 100.0) -> Metric:
    """Metric: CLIP's symmetric InfoNCE loss of the batch against paired text embeddings [B, D]."""
    def metric(embedding: Tensor) -> Tensor:
        logits = logit_scale * cosine_logits(embedding, text_embeddings)
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return metric


def _reduce(values: Tensor, reduce: str) -> Tensor:
    if reduce == "mean":
        return values.mean()
    if reduce == "sum":
        return values.sum()
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def evaluate_metric(metric: Metric, embedding: Tensor) -> Tensor:
    """metric(embedding), checked to be a scalar (a per-image metric must be reduced first)."""
    value = metric(embedding)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor, got {shape}; reduce over the batch "
                         "(e.g. .mean() or .sum()) inside the metric")
    return value.reshape(())


# --------------------------------------------------------------------------------------- layouts
def node_dim(point: str, ndim: int) -> int:
    """The axis holding a point's nodes: heads of [B, T, H, d_head], channels of [B, C, H, W] (and
    heads of [B, H, Tq, Tk] patterns), the last axis otherwise."""
    if ndim == 4 and point.endswith(_HEAD_SUFFIXES):
        return 2
    if ndim == 4:
        return 1
    return ndim - 1


def node_sum(x: Tensor, point: str) -> Tensor:
    """[B, C]: `x` summed over every axis except batch and the node axis."""
    d = node_dim(point, x.ndim)
    dims = [i for i in range(1, x.ndim) if i != d]
    return x.sum(dim=dims) if dims else x


def check_points(model, points: Sequence[str]) -> None:
    """Raise KeyError (with the 3 closest names) for any point that is not a hook of `model`."""
    valid = list(model.hook_names())
    for p in points:
        if p not in valid:
            raise unknown_name_error("hook point", p, valid)


def check_same_shape(a: Tensor, b: Tensor, what_a: str, what_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what_a} {tuple(a.shape)} and {what_b} {tuple(b.shape)} must have the same shape "
                         "(pair each image with one counterpart)")


def cache_points(model, images: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
    """Detached activations of `points` for `images` (no grad), stopping after the last one needed."""
    check_points(model, points)
    order = list(model.hook_names())
    last = max(points, key=order.index)
    with torch.no_grad():
        _, cache = model.run_with_cache(image=images, names_filter=list(points), stop_at=last)
    return {p: cache[p].detach() for p in points}


def segment_fn(model, point: str, images: Tensor, stop_at: str | None = None) -> Callable[[Tensor], Tensor]:
    """f(act) = the image tower from `point` (act standing in for its value, k stacked copies of the
    batch allowed) to `stop_at` (None: the unnormalised embedding). From an analysis point this is
    `forward_from`; from any other point the run starts at the last analysis point before it with
    its clean value (pixels if none) and `act` is patched in by a hook, so only that segment runs."""
    if point in model.analysis_points():
        return lambda act: model.forward_from(point, act, stop_at=stop_at)
    order = list(model.hook_names())
    before = [p for p in model.analysis_points() if order.index(p) < order.index(point)]
    start = before[-1] if before else None
    start_value = cache_points(model, images, [start])[start] if start else images
    target = stop_at or "hook_image_embed"

    def run(act: Tensor) -> Tensor:
        reps = len(act) // len(images)
        value = start_value.repeat(reps, *([1] * (start_value.ndim - 1)))
        with model.hooks(fwd_hooks=[(point, lambda t, hook: act)]):
            if start is None:
                return model(image=value, stop_at=target)
            return model.forward_from(start, value, stop_at=target)
    return run


# --------------------------------------------------------------------------------- exact patching
def _n_units(shape: torch.Size, point: str, granularity: Granularity) -> int:
    """Number of patchable units of an activation of shape [B, ...] at `point`."""
    if granularity == "point":
        return 1
    if granularity == "head" and not (len(shape) == 4 and point.endswith(_HEAD_SUFFIXES)):
        raise ValueError(f"granularity 'head' needs a per-head point (…attn.hook_q/k/v/z of shape "
                         f"[B, T, H, d_head]); {point!r} has shape {tuple(shape)}")
    if granularity in ("channel", "head"):
        return shape[node_dim(point, len(shape))]
    if granularity == "position":
        if len(shape) == 2:
            raise ValueError(f"{point!r} of shape {tuple(shape)} has no positions; use granularity 'channel'")
        return shape[2] * shape[3] if node_dim(point, len(shape)) == 1 else shape[1]
    raise ValueError(f"granularity must be one of point/channel/position/head, got {granularity!r}")


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


def replacement(model, images: Tensor, point: str, mode: str, *, source: Tensor | None = None,
                reference: Tensor | None = None, seed: int = 0) -> Tensor:
    """The values patched in at `point` for `images`: 'zero'; 'mean' (over the `reference` images, or
    `images` when none); 'resample' (the activations of `source`, image b for image b, e.g. a photo
    of class k for a sketch of class k; without `source`, of randomly drawn `reference` images)."""
    clean = cache_points(model, images, [point])[point]
    if mode == "zero":
        return torch.zeros_like(clean)
    if mode == "mean":
        ref = clean if reference is None else cache_points(model, reference, [point])[point]
        return ref.mean(0, keepdim=True).expand_as(clean)
    if mode == "resample":
        if source is not None:
            check_same_shape(images, source, "clean images", "source images")
            return cache_points(model, source, [point])[point]
        if reference is None:
            raise ValueError("mode 'resample' needs source images (paired) or reference images (drawn at random)")
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(reference), (len(images),), generator=gen)
        return cache_points(model, reference[pick], [point])[point]
    raise ValueError(f"ablation mode must be 'zero', 'mean' or 'resample', got {mode!r}")


def activation_patch(model, images: Tensor, metric: Metric, point: str, *,
                     granularity: Granularity = "channel", mode: str = "zero", source: Tensor | None = None,
                     reference: Tensor | None = None, units: Sequence[int] | None = None,
                     batch_units: int = 16, seed: int = 0) -> Tensor:
    """Exact patching: for each unit (whole point, channel, position or head) of `point`, replace its
    values in the run on `images` (see `replacement` for `mode`/`source`/`reference`) and rerun the
    segment point -> embedding. Returns Tensor[len(units)] of metric(patched) - metric(clean).

    Cost: one forward of the segment per unit, `batch_units` units stacked into one batch.
    """
    check_points(model, [point])
    clean = cache_points(model, images, [point])[point]
    repl = replacement(model, images, point, mode, source=source, reference=reference, seed=seed)
    n = _n_units(clean.shape, point, granularity)
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


def _unit_reduce(x: Tensor, point: str, granularity: Granularity) -> Tensor:
    """Sum an elementwise attribution [B, ...] within each unit -> Tensor[n_units]."""
    if granularity == "point":
        return x.sum().reshape(1)
    _n_units(x.shape, point, granularity)  # validates granularity against the layout
    if granularity in ("channel", "head"):
        return node_sum(x, point).sum(0)
    if node_dim(point, x.ndim) == 1 and x.ndim == 4:
        return x.sum(dim=(0, 1)).flatten()
    return x.sum(dim=[i for i in range(x.ndim) if i != 1])


# ----------------------------------------------------------------------------- attribution patching
def attribution_patch(model, clean: Tensor, corrupt: Tensor, metric: Metric, points: Sequence[str] | None = None,
                      granularity: Granularity = "channel") -> dict[str, Tensor]:
    """First-order estimate, for every unit of every point, of patching the clean activation into
    the corrupt run: (a_clean - a_corrupt) . dmetric/da at the corrupt run. Approximates
    `activation_patch(model, corrupt, metric, p, mode="resample", source=clean)`.

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
        out[p] = _unit_reduce((clean_acts[p] - corrupt_acts[p].detach()) * g, p, granularity).detach()
    return out


# ----------------------------------------------------------------------------- integrated gradients
def riemann_alphas(steps: int, rule: str) -> list[float]:
    """Interpolation coefficients alpha (0 = baseline, 1 = input) of a `steps`-point Riemann sum."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    offsets = {"left": 0.0, "right": 1.0, "midpoint": 0.5}
    if rule not in offsets:
        raise ValueError(f"rule must be 'left', 'right' or 'midpoint', got {rule!r}")
    return [(s + offsets[rule]) / steps for s in range(steps)]


def mean_gradient_along_path(fn: Callable[[Tensor], Tensor], x: Tensor, baseline: Tensor, alphas: Sequence[float],
                             internal_batch_size: int | None = None) -> Tensor:
    """mean over alpha of d fn / d x' at x' = baseline + alpha (x - baseline), for a function `fn`
    of a batch [N, ...] returning a scalar that is a SUM of per-example terms (so the path copies can
    be stacked into one batch). Returns a tensor shaped like `x`. Cost: len(alphas) * N examples
    through `fn` (forward + backward), `internal_batch_size` path points per call."""
    per_call = internal_batch_size or len(alphas)
    total = torch.zeros_like(x)
    for start in range(0, len(alphas), per_call):
        a = torch.tensor(alphas[start:start + per_call], dtype=x.dtype, device=x.device)
        shape = (len(a),) + (1,) * x.ndim
        path = (baseline[None] + a.view(shape) * (x - baseline)[None]).flatten(0, 1).detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(path), path)
        total += g.unflatten(0, (len(a), len(x))).sum(0)
    return total / len(alphas)


def integrated_gradients(model, images: Tensor, metric: Metric, point: str, *, baseline: str | Tensor = "zero",
                         reference: Tensor | None = None, corrupt: Tensor | None = None, steps: int = 10,
                         rule: str = "midpoint", granularity: Granularity = "channel",
                         internal_batch_size: int | None = None) -> Tensor:
    """IG attributions of the units of `point` toward a baseline activation: 'zero', 'mean' (over
    `reference` images, default `images`), 'corrupt' (the activations of `corrupt` images, paired)
    or an explicit tensor. attribution = sum within unit of (a - a0) * mean_alpha grad at
    a0 + alpha (a - a0); `rule` picks alpha = s/steps, (s+1)/steps or (s+0.5)/steps.
    Returns Tensor[n_units]; they sum to about metric(a) - metric(a0) (completeness).

    Cost: `steps` forward+backward passes of the segment point -> embedding over the batch, run as
    one batch of steps*B unless `internal_batch_size` (path points per pass) is given.
    """
    check_points(model, [point])
    a = cache_points(model, images, [point])[point]
    if isinstance(baseline, Tensor):
        a0 = baseline.to(a).expand_as(a)
    elif baseline == "zero":
        a0 = torch.zeros_like(a)
    elif baseline == "mean":
        a0 = replacement(model, images, point, "mean", reference=reference)
    elif baseline == "corrupt":
        if corrupt is None:
            raise ValueError("baseline 'corrupt' needs corrupt images")
        a0 = replacement(model, images, point, "resample", source=corrupt)
    else:
        raise ValueError(f"baseline must be 'zero', 'mean', 'corrupt' or a tensor, got {baseline!r}")
    n, run = len(images), segment_fn(model, point, images)

    def summed_metric(path: Tensor) -> Tensor:
        # The metric is defined on one batch of B images; each path point contributes one batch.
        emb = run(path).unflatten(0, (-1, n))
        return sum(evaluate_metric(metric, e) for e in emb)

    g = mean_gradient_along_path(summed_metric, a, a0, riemann_alphas(steps, rule), internal_batch_size)
    return _unit_reduce((a - a0) * g, point, granularity).detach()


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
