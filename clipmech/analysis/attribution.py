"""The attribution engine: integrated gradients (IG) on any hook point of a `HookedCLIP`, the
paper's node and edge scores (§8.4), and the cost model that picks how edges are computed.

Conventions shared by every attribution, patching and circuit function
- `metric`: a callable from the unnormalised image embedding [B, D] to a scalar tensor
  (`clipmech.analysis.metrics`); where labels and a zero-shot head are given it defaults to the
  true-class cosine logit.
- `ablation`: what a removed activation is replaced by, one of `ABLATIONS`: "zero", "mean" (over
  reference images) or "resample" (the activation of another image, paired or drawn).
- `rule`: the Riemann rule of every IG path, default `RIEMANN_RULE` ("right", the paper's: path
  points alpha = (s+1)/steps, i.e. (1 - s/steps)·a from a zero baseline).
- A *node* of a point is one slice along its node axis (`node_dim`): channels of a conv map
  [B, C, H, W], the last axis of token streams [B, T, D] and vectors [B, D], heads of per-head
  tensors [B, T, H, d_head]. Positions are the spatial / token positions.

Only the segment from a point to the embedding (or to the next point) is run
(`HookedCLIP.forward_from`). The paper's edge u/i -> d/j is the IG, over point u, of the squared
deviation of downstream node j from its clean value; its code reruns the full model once per
downstream node. Here the segment u -> d runs once and the edges come from one VJP per downstream
node over that graph, one JVP per upstream node or, when the segment is one ResNet bottleneck, its
Jacobian split at the 3x3 convolution (`clipmech.analysis.bottleneck_edges`), whichever a cost
model (`plan_edges`) finds cheaper. Our own code because captum's layer methods rerun the whole
model per step, TransformerLens's patching helpers assume its transformer classes and no circuit
library handles CNNs or CLIP; captum's `LayerIntegratedGradients` is the reference our IG is
tested against.

With an SAE (any object with `encode(x[..., C]) -> z[..., L]` and `decode(z) -> x`) a point's
nodes are its latents and the activation is rebuilt as decode(z) + error, the error held at its
clean value (Marks et al.).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from clipmech.analysis.bottleneck_edges import bottleneck_edges, unsplittable_reason
from clipmech.analysis.metrics import Metric, evaluate_metric, true_class_logit
from clipmech.utils import unknown_name_error, warn_renamed

Granularity = Literal["point", "channel", "position", "head"]
ABLATIONS = ("zero", "mean", "resample")
RIEMANN_RULE = "right"
_HEAD_SUFFIXES = ("hook_q", "hook_k", "hook_v", "hook_z")


# ------------------------------------------------------------------------- points and segments
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


def component_points(model) -> list[str]:
    """ViT circuit points with heads and MLP neurons as nodes: per block, attn.hook_z then
    mlp.hook_post (in forward order)."""
    names = list(model.hook_names())
    pts = [n for n in names if n.startswith("visual.blocks.") and n.endswith(("attn.hook_z", "mlp.hook_post"))]
    if not pts:
        raise ValueError("component_points needs a ViT image tower (no visual.blocks.*.attn.hook_z hooks found)")
    return pts



# ------------------------------------------------------------------------------ units of a point
def n_units(shape: torch.Size, point: str, granularity: Granularity) -> int:
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



def unit_sum(x: Tensor, point: str, granularity: Granularity) -> Tensor:
    """Sum an elementwise attribution [B, ...] within each unit -> Tensor[n_units]."""
    if granularity == "point":
        return x.sum().reshape(1)
    n_units(x.shape, point, granularity)  # validates granularity against the layout
    if granularity in ("channel", "head"):
        return node_sum(x, point).sum(0)
    if node_dim(point, x.ndim) == 1 and x.ndim == 4:
        return x.sum(dim=(0, 1)).flatten()
    return x.sum(dim=[i for i in range(x.ndim) if i != 1])


# ------------------------------------------------------------------------- replacement values
def replacement(model, images: Tensor, point: str, ablation: str = "zero", *, source: Tensor | None = None,
                reference: Tensor | None = None, seed: int = 0, mode: str | None = None) -> Tensor:
    """The values [B, ...] that replace the activation of `point` for `images` under `ablation`:
    'zero'; 'mean' (over the `reference` images, or `images` when none); 'resample' (the
    activations of `source`, image b for image b, e.g. a photo of class k for a sketch of class k;
    without `source`, of randomly drawn `reference` images). `mode=` is the deprecated name of
    `ablation`. Cost: one forward to `point` per image set used."""
    if mode is not None:
        warn_renamed("replacement(mode=...)", "ablation=...")
        ablation = mode
    clean = cache_points(model, images, [point])[point]
    if ablation == "zero":
        return torch.zeros_like(clean)
    if ablation == "mean":
        ref = clean if reference is None else cache_points(model, reference, [point])[point]
        return ref.mean(0, keepdim=True).expand_as(clean)
    if ablation == "resample":
        if source is not None:
            check_same_shape(images, source, "clean images", "source images")
            return cache_points(model, source, [point])[point]
        if reference is None:
            raise ValueError("ablation 'resample' needs source images (paired) or reference images (drawn at random)")
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(reference), (len(images),), generator=gen)
        return cache_points(model, reference[pick], [point])[point]
    raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")


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


def _summed_over_copies(metric: Metric, n: int) -> Callable[[Tensor], Tensor]:
    """f(embeddings of k stacked copies of an n-image batch) = sum over copies of metric(copy): a
    metric is defined on one batch, and each IG path point contributes one batch."""
    return lambda emb: sum(evaluate_metric(metric, e) for e in emb.unflatten(0, (-1, n)))


def integrated_gradients(model, images: Tensor, metric: Metric, point: str, *, ablation: str | Tensor = "zero",
                         reference: Tensor | None = None, source: Tensor | None = None, steps: int = 10,
                         rule: str = RIEMANN_RULE, granularity: Granularity = "channel",
                         internal_batch_size: int | None = None, baseline: str | Tensor | None = None,
                         corrupt: Tensor | None = None) -> Tensor:
    """IG attributions of the units of `point` toward the activation a0 that `ablation` puts there
    ('zero', 'mean' over `reference` images, 'resample' with the `source` images' activations, see
    `replacement`) or an explicit tensor. attribution = sum within unit of (a - a0) * mean_alpha
    grad at a0 + alpha (a - a0); `rule` picks alpha = s/steps ('left'), (s+1)/steps ('right', the
    default) or (s+0.5)/steps ('midpoint'). Returns Tensor[n_units]; they sum to about metric(a) -
    metric(a0) (completeness). Deprecated: `baseline=` (now `ablation=`; its value 'corrupt' is
    'resample') and `corrupt=` (now `source=`).

    Cost: `steps` forward+backward passes of the segment point -> embedding over the batch, run as
    one batch of steps*B unless `internal_batch_size` (path points per pass) is given.
    """
    if baseline is not None:
        warn_renamed("integrated_gradients(baseline=...)", "ablation=...")
        ablation = baseline
    if corrupt is not None:
        warn_renamed("integrated_gradients(corrupt=...)", "source=...")
        source = corrupt
    if isinstance(ablation, str) and ablation == "corrupt":
        warn_renamed("the ablation 'corrupt'", "'resample' with source=")
        ablation = "resample"
    check_points(model, [point])
    a = cache_points(model, images, [point])[point]
    if isinstance(ablation, Tensor):
        a0 = ablation.to(a).expand_as(a)
    else:
        a0 = replacement(model, images, point, ablation, reference=reference, source=source)
    run, summed_metric = segment_fn(model, point, images), _summed_over_copies(metric, len(images))
    g = mean_gradient_along_path(lambda path: summed_metric(run(path)), a, a0, riemann_alphas(steps, rule),
                                 internal_batch_size)
    return unit_sum((a - a0) * g, point, granularity).detach()


# ------------------------------------------------------------------------------------ node spaces
class NodeSpace:
    """Maps a point's activation to node-last node values [B, ..., C] and back (identity or SAE)."""

    def __init__(self, point: str, clean: Tensor, sae: Any = None):
        self.point, self.sae = point, sae
        self.dim = node_dim(point, clean.ndim)
        x = clean.movedim(self.dim, -1)
        if sae is not None:
            if clean.ndim == 4 and self.dim == 2:
                raise ValueError(f"SAEs on per-head points are not supported ({point!r})")
            # The reconstruction error stays at its clean value, so z = encode(clean) reproduces clean.
            self.error = (x - sae.decode(sae.encode(x))).detach()
        self.clean = self.nodes(clean).detach()

    def nodes(self, act: Tensor) -> Tensor:
        x = act.movedim(self.dim, -1)
        return x if self.sae is None else self.sae.encode(x)

    def activation(self, z: Tensor) -> Tensor:
        """Activation for node values `z` [k*B, ..., C] (k stacked copies of the batch)."""
        if self.sae is not None:
            reps = len(z) // len(self.error)
            z = self.sae.decode(z) + self.error.repeat(reps, *([1] * (z.ndim - 1)))
        return z.movedim(-1, self.dim)

    @property
    def n_nodes(self) -> int:
        return self.clean.shape[-1]

    def select(self, rows: Sequence[int]) -> "NodeSpace":
        """The space of the images `rows` of this one (plain nodes only: an SAE's error is per batch)."""
        if self.sae is not None:
            raise ValueError(f"an SAE node space ({self.point!r}) cannot be split by images")
        out = copy.copy(self)
        out.clean = self.clean[torch.as_tensor([int(i) for i in rows], dtype=torch.long)]
        return out


def _position_sum(x: Tensor) -> Tensor:
    """[B, C]: node-last values summed over positions."""
    return x.flatten(1, -2).sum(1) if x.ndim > 2 else x


def node_spaces(model, images: Tensor, points: Sequence[str], saes: Mapping[str, Any] | None = None
                ) -> dict[str, NodeSpace]:
    """{point: NodeSpace} of `images` at `points` (SAE latents where `saes` gives one). Cost: one
    forward up to the last point."""
    saes = dict(saes or {})
    unknown = set(saes) - set(points)
    if unknown:
        raise ValueError(f"SAEs given for points {sorted(unknown)} that are not circuit points")
    acts = cache_points(model, images, points)
    return {p: NodeSpace(p, acts[p], saes.get(p)) for p in points}


def _edge_point_orders(model) -> list[list[str]]:
    """The point sequences whose consecutive pairs have edges: analysis points, and for a ViT its
    head / MLP-neuron component points."""
    names = list(model.hook_names())
    if any(n.endswith("attn.hook_z") and n.startswith("visual.blocks.") for n in names):
        return [list(model.analysis_points()), component_points(model)]
    return [list(model.analysis_points())]


def _check_consecutive(model, upstream: str, downstream: str) -> None:
    check_points(model, [upstream, downstream])
    orders = _edge_point_orders(model)
    for p in (upstream, downstream):
        if not any(p in points for points in orders):
            raise ValueError(f"{p!r} is not an analysis point; ig_edge_scores needs consecutive points of "
                             f"model.analysis_points(): {orders[0]}" + (" or of component_points(model)" if len(orders) > 1 else ""))
    for points in orders:
        if upstream in points and downstream in points and points.index(downstream) == points.index(upstream) + 1:
            return
    points = next(points for points in orders if upstream in points)
    i = points.index(upstream)
    after = points[i + 1] if i + 1 < len(points) else "nothing (it is the last point)"
    raise ValueError(f"ig_edge_scores needs consecutive points; after {upstream!r} comes {after}, not {downstream!r}")


# ------------------------------------------------------------------------------------ node scores
def ig_node_scores_in(model, images: Tensor, labels: Tensor | None, head: Tensor | None, space: NodeSpace, steps: int,
                 internal_batch_size: int | None = None, *, metric: Metric | None = None,
                 rule: str = RIEMANN_RULE) -> Tensor:
    return _node_ig_per_image(model, images, labels, head, space, steps, internal_batch_size, metric, rule).mean(0).abs()


def _node_ig_per_image(model, images: Tensor, labels: Tensor | None, head: Tensor | None, space: NodeSpace,
                       steps: int, internal_batch_size: int | None, metric: Metric | None, rule: str) -> Tensor:
    """[B, C]: each image's sum over positions of g ⊙ (0 - a), g the mean path gradient of the metric
    (default: the summed true-class logit). The node score is |mean over images| of this."""
    run = segment_fn(model, space.point, images)
    if metric is None:
        if labels is None or head is None:
            raise ValueError("node scores need labels and a zero-shot head (the default metric, the summed "
                             "true-class logit) or a metric=")
        labels = torch.as_tensor(labels, device=images.device).long()
        if labels.shape != (len(images),):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {len(images)} images")

        def summed_metric(emb: Tensor) -> Tensor:
            # One sum over all stacked copies (not a sum of per-copy sums): bit-identical to the
            # committed circuits.
            return evaluate_metric(true_class_logit(head, labels.repeat(len(emb) // len(images)), reduce="sum"), emb)
    else:
        summed_metric = _summed_over_copies(metric, len(images))

    z = space.clean
    g = mean_gradient_along_path(lambda x: summed_metric(run(space.activation(x))), z, torch.zeros_like(z),
                                 riemann_alphas(steps, rule), internal_batch_size)
    return _position_sum(g * (0 - z)).detach()


def ig_node_scores_grouped(model, images: Tensor, labels: Tensor, head: Tensor, space: NodeSpace, steps: int,
                           groups: Sequence[Sequence[int]], *, rule: str = RIEMANN_RULE,
                           max_images: int = 64) -> list[Tensor]:
    """The paper's node scores (`ig_node_scores`, default metric) of several batches at once:
    scores[g] = |mean over the rows `groups[g]` of images of sum_positions (g ⊙ (0 - a))|, the same
    number `ig_node_scores_in` gives on images[groups[g]] alone, up to float summation order.
    Why: the summed true-class logit is a sum of per-image terms, so each image's path gradient
    does not depend on the others, and one forward + backward over many small (domain, class)
    batches replaces one per batch (48 one-image cells of tiny-rn: ~3x less time, dominated by
    per-call overhead). `space` holds every image's clean nodes (no SAE: its reconstruction error
    is per batch). Cost: steps * len(images) examples through the segment, `max_images` images
    (times steps) per call."""
    if space.sae is not None:
        raise ValueError("grouped node scores need plain nodes; with an SAE use ig_node_scores_in per batch")
    labels = torch.as_tensor(labels, device=images.device).long()
    if labels.shape != (len(images),):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {len(images)} images")
    chunks = [range(start, min(start + max_images, len(images))) for start in range(0, len(images), max_images)]
    per_image = torch.cat([_node_ig_per_image(model, images[r.start:r.stop], labels[r.start:r.stop], head,
                                              space.select(r), steps, None, None, rule).cpu() for r in chunks])
    return [per_image[torch.as_tensor([int(i) for i in rows], dtype=torch.long)].mean(0).abs() for rows in groups]


def ig_node_scores(model, images: Tensor, labels: Tensor | None, head: Tensor | None, point: str, steps: int = 10, *,
                   metric: Metric | None = None, rule: str = RIEMANN_RULE) -> Tensor:
    """The paper's node scores at `point`, Tensor[C]: g = mean gradient of the metric at the IG path
    points alpha·a (alpha by `rule`; the paper's right rule gives (1 - s/steps)·a, s = 0..steps-1);
    score[c] = |mean_b sum_positions (g ⊙ (0 - a))[:, c]|. The metric defaults to the paper's, the
    sum over the batch of the true-class cosine logit (`head` [K, D] normalised zero-shot rows,
    `labels` [B]); a `metric` given instead (labels and head may then be None) should also sum
    over the batch for the scores to be per-image attributions.

    Cost: steps*B examples forward+backward through the segment point -> embedding, one batch.
    """
    check_points(model, [point])
    space = NodeSpace(point, cache_points(model, images, [point])[point])
    return ig_node_scores_in(model, images, labels, head, space, steps, metric=metric, rule=rule)


# ------------------------------------------------------------------------------------ edge scores
# An edge score is a bilinear form: edge[j, i] = sum_s <r_s[..., j], (J_s v_i)[..., j]> / (B·steps), with
# J_s the segment's Jacobian at path point s, r_s = dm/dy (2 (y - clean) / (B·positions)) and v_i = -a_u
# on upstream node i. Backward mode takes one vector-Jacobian product per downstream node j, forward mode
# one Jacobian-vector product per upstream node i; 'split' (ResNet bottleneck segments only) carries r_j
# and v_i to the 3x3 convolution at one channel's cost each and runs that convolution over
# min(|N_u|, |N_d|) of them in one batch (`clipmech.analysis.bottleneck_edges`). All are exact; which is
# cheapest depends on the node counts and the segment, hence a cost model (`plan_edges`) and an opt-in
# calibration.
EDGE_STRATEGIES = ("backward", "forward", "split")
# Cost model in units of one per-node VJP of the segment over all path points; a plain forward of the
# segment costs about as much. Measured in CPU seconds, one thread, 2026-11-29 (benchmarks/circuit_edges.py):
# a vmapped JVP costs 1.5-2.4x a VJP per node (forward-mode batch norm / ReLU and vmap's layout copies) plus a
# fixed overhead; per node it is 1.2-1.8x a VJP on maps of <= 16 positions (tiny-rn layer3 -> layer4 won
# 1.2-1.35x) but ~5x on 256-3136 positions (tiny-rn and RN50 avgpool -> layer1: 0.6-0.75x), so the per-node
# factor rises log-linearly from 1.8 at 16 upstream positions to 5 at 256. Several segment copies per VJP
# (EdgePlan chunk > 1) gained nothing (0.75-1.08x) on one thread, so the model never picks them.
_FORWARD_PASS = 1.0
_FORWARD_PER_NODE = (1.8, 5.0)  # at <= 16 and >= 256 upstream positions per example
_FORWARD_FIXED = 4.5
# Split: one block forward, conv2 over the smaller side's nodes, one-channel products and a contraction over
# the larger side's. Fitted on the tiny-rn widths at RN50 depth (1 thread, 8 images, 9 path points): beyond
# the forward it took 0.28-0.42 VJPs per node at equal widths (0.2 per node of either side) and 0.55-0.66 per
# smaller-side node at stage transitions, where |N_d| = 2 |N_u| (0.2 x 3 = 0.6).
_SPLIT_PER_NODE = 0.2
_SPLIT_CHUNK = 16  # conv2 inputs per batched convolution: larger batches ran no faster (8-64 within noise)
# Retained autograd graph per element of (upstream + downstream activation), in activations; a bottleneck
# segment keeps about six maps of that size (convs, norms, ReLU masks).
_GRAPH_FACTOR = 6
EDGE_MEMORY = 4 * 2 ** 30  # bytes one segment run may hold; more IG path points are looped, not batched


@dataclass(frozen=True)
class EdgePlan:
    """How one segment's edges are computed: `strategy` 'backward' (one VJP per downstream node over
    one retained graph; `chunk` copies of the segment batch serve `chunk` nodes per VJP, 1 = plain
    loop), 'forward' (one JVP per upstream node, `chunk` tangents per vmapped JVP) or 'split'
    (bottleneck Jacobian split at its 3x3 conv, `chunk` nodes per batched conv); `step_chunk` IG
    path points per segment run (the rest looped); `cost` the cost model's estimate per strategy."""

    strategy: str
    chunk: int
    step_chunk: int
    cost: dict[str, float] = field(default_factory=dict, compare=False)


def plan_edges(up_numel: int, down_numel: int, n_down: int, n_up: int, n_points: int, strategy: str | None = None,
               itemsize: int = 4, memory: int = EDGE_MEMORY, up_positions: int = 1,
               split_numel: int | None = None) -> EdgePlan:
    """Deterministic choice of edge strategy for a segment whose upstream / downstream activations
    hold `up_numel` / `down_numel` elements per IG path point (batch included), `n_down` downstream
    and `n_up` upstream nodes, `n_points` path points, `up_positions` values per upstream node and
    example; `split_numel` the elements of its 3x3 conv's activation per path point when the segment
    is one splittable ResNet bottleneck (None: it is not). `strategy` forces one. Cost, in units of
    one per-node VJP: backward 1 + n_down, forward 4.5 + f n_up with f from 1.8 (<= 16 positions) to
    5 (>= 256), split 1 + 0.2 (n_up + n_down); chunks and path points per run are the largest that
    keep a run within `memory` bytes (split: at most 16 conv inputs per batch)."""
    if strategy is not None and strategy not in EDGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {EDGE_STRATEGIES} or None (cost model), got {strategy!r}")
    if strategy == "split" and split_numel is None:
        raise ValueError("strategy 'split' needs a segment that is one ResNet bottleneck (split_numel)")
    low, high = _FORWARD_PER_NODE
    per_node = low + (high - low) * min(max(math.log2(max(up_positions, 1) / 16) / 4, 0.0), 1.0)
    per_point = (up_numel + down_numel) * itemsize
    tangents = max(1, min(n_up, memory // (3 * per_point * n_points)))
    plans = {"backward": (1, max(1, min(n_points, memory // (_GRAPH_FACTOR * per_point)))),
             "forward": (tangents, max(1, min(n_points, memory // (3 * tangents * per_point))))}
    cost = {"backward": _FORWARD_PASS + n_down, "forward": _FORWARD_FIXED + per_node * n_up}
    if split_numel is not None:
        # One run holds the larger side's vectors, two chunks of the smaller side's, and the block's maps.
        chunk = max(1, min(_SPLIT_CHUNK, n_up, n_down))
        split_point = (max(n_up, n_down) + 2 * chunk + 4) * split_numel * itemsize + 2 * per_point
        plans["split"] = (chunk, max(1, min(n_points, memory // split_point)))
        cost["split"] = _FORWARD_PASS + _SPLIT_PER_NODE * (n_up + n_down)
    chosen = strategy or min(cost, key=lambda s: (cost[s], s))
    return EdgePlan(chosen, *plans[chosen], cost={s: round(v, 3) for s, v in cost.items()})


def _check_node_indices(nodes: Tensor, space: NodeSpace, what: str) -> None:
    if len(nodes) and not (0 <= int(nodes.min()) and int(nodes.max()) < space.n_nodes):
        raise ValueError(f"{what} must lie in [0, {space.n_nodes}) for {space.point!r}")


def _segment_block(model, up: NodeSpace, down: NodeSpace) -> tuple[Any, str | None]:
    """(the open_clip Bottleneck that is the whole segment up -> down, None) or (None, why not)."""
    points = list(model.analysis_points())
    block_name = down.point.removesuffix(".hook_out")
    if not (re.fullmatch(r"visual\.layer\d+\.\d+", block_name) and up.point in points
            and points.index(up.point) + 1 == points.index(down.point)):
        return None, f"{up.point!r} -> {down.point!r} is not one ResNet bottleneck"
    if up.sae is not None or down.sae is not None:
        return None, "its nodes are SAE latents"
    hook_points = [model.hook_dict[n] for n in model.hook_names() if n.startswith(block_name + ".")]
    if any(hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks or hp._backward_pre_hooks
           for hp in hook_points):
        return None, f"hooks are attached inside {block_name}"
    block = model.get_submodule(block_name)
    reason = unsplittable_reason(block)
    return (None, reason) if reason else (block, None)


class _EdgeProblem:
    """One segment's edge IG: the path points (alpha·a_u in node space), the segment function in
    node space, the metric residual scale and, for a bottleneck segment, its block;
    `backward` / `forward` / `split` accumulate edge[J, I]."""

    def __init__(self, model, images: Tensor, up: NodeSpace, down: NodeSpace, down_nodes: Tensor,
                 up_nodes: Tensor, steps: int, rule: str = RIEMANN_RULE):
        self.model, self.up, self.down, self.steps = model, up, down, steps
        self.down_nodes, self.up_nodes = down_nodes.to(up.clean.device), up_nodes.to(up.clean.device)
        z = up.clean
        self.n = len(z)
        # At alpha = 1 the segment reproduces the clean downstream value, so m_j and its gradient are 0:
        # that path point (the last of the right rule) is skipped; it still counts in the 1/steps average.
        alphas = [a for a in riemann_alphas(steps, rule) if a != 1.0]
        self.alphas = torch.tensor(alphas, dtype=z.dtype, device=z.device)
        self.scale = 2.0 / (self.n * down.clean[0, ..., 0].numel())  # dm_j/dy = scale·(y - clean)
        segment = segment_fn(model, up.point, images, stop_at=down.point)
        self.f = lambda x: down.nodes(segment(up.activation(x)))
        self.block, self.unsplittable = _segment_block(model, up, down)

    def path(self, alphas: Tensor, copies: int = 1) -> Tensor:
        z = self.up.clean
        p = (alphas.view(-1, *([1] * z.ndim)) * z[None]).flatten(0, 1)
        return p.repeat(copies, *([1] * (p.ndim - 1)))

    def residual(self, y: Tensor) -> Tensor:
        clean = self.down.clean
        return self.scale * (y - clean.repeat(len(y) // len(clean), *([1] * (y.ndim - 1))))

    def backward(self, alphas: Tensor, copies: int) -> Tensor:
        """[J, I] summed over `alphas`: one graph over `copies` copies of the path batch, one VJP per
        `copies` downstream nodes (copy c carries node c's cotangent)."""
        x = self.path(alphas, copies).detach().requires_grad_(True)
        with torch.enable_grad():
            y = self.f(x)
        resid = self.residual(y.detach()).unflatten(0, (copies, -1))
        cot = torch.zeros_like(resid)
        v = (0 - self.up.clean[..., self.up_nodes])[None]
        rows = []
        for start in range(0, len(self.down_nodes), copies):
            sel = self.down_nodes[start:start + copies]
            cot.zero_()
            for c, j in enumerate(sel.tolist()):
                cot[c, ..., j] = resid[c, ..., j]
            (g,) = torch.autograd.grad(y, x, cot.flatten(0, 1), retain_graph=True)
            g = g[..., self.up_nodes].unflatten(0, (copies, len(alphas), self.n)).sum(1)[:len(sel)]
            rows.append(_position_sum((g * v).flatten(0, 1)).unflatten(0, (len(sel), self.n)).sum(1))
        return torch.cat(rows)

    def forward(self, alphas: Tensor, tangents: int) -> Tensor:
        """[J, I] summed over `alphas`: JVPs along v_i = -a_u on upstream node i, `tangents` at a time
        (vmapped over one primal)."""
        x = self.path(alphas)
        # The primal output does not depend on the tangent, so vmap returns it once (out_dims None).
        jvp = torch.func.vmap(lambda t: torch.func.jvp(self.f, (x,), (t,)), out_dims=(None, 0))
        cols, resid = [], None
        for start in range(0, len(self.up_nodes), tangents):
            sel = self.up_nodes[start:start + tangents]
            t = x.new_zeros(len(sel), *x.shape)
            for c, i in enumerate(sel.tolist()):
                t[c, ..., i] = (0 - self.up.clean[..., i]).repeat(len(alphas), *([1] * (x.ndim - 2)))
            y, out = jvp(t)
            if resid is None:
                resid = self.residual(y.detach())[..., self.down_nodes]
            cols.append((out[..., self.down_nodes] * resid[None]).flatten(1, -2).sum(1).T)  # [J, k]
        return torch.cat(cols, 1)

    def split(self, alphas: Tensor, chunk: int) -> Tensor:
        """[J, I] summed over `alphas` through the bottleneck's Jacobian split at its 3x3 conv."""
        return bottleneck_edges(self.block, self.up.clean.movedim(-1, 1), self.down.clean.movedim(-1, 1), alphas,
                                self.down_nodes, self.up_nodes, self.scale, chunk)

    @property
    def split_numel(self) -> int | None:
        """Elements of the bottleneck's 3x3-conv activation per path point, or None (not a bottleneck)."""
        if self.block is None:
            return None
        conv2, (height, width) = self.block.conv2, self.up.clean.shape[1:3]
        return self.n * conv2.out_channels * height * width

    @property
    def empty(self) -> bool:
        return len(self.down_nodes) == 0 or len(self.up_nodes) == 0 or len(self.alphas) == 0

    def run(self, plan: EdgePlan) -> Tensor:
        total = self.up.clean.new_zeros(len(self.down_nodes), len(self.up_nodes))
        for start in range(0, len(self.alphas), plan.step_chunk):
            alphas = self.alphas[start:start + plan.step_chunk]
            if plan.strategy == "backward":
                total = total + self.backward(alphas, plan.chunk)
            elif plan.strategy == "split":
                total = total + self.split(alphas, plan.chunk)
            else:
                # SDPA has no forward-mode derivative: a (no-op) pattern hook selects explicit softmax attention.
                with self.model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_pattern"), _no_op)]):
                    total = total + self.forward(alphas, plan.chunk)
        return (total / (self.n * self.steps)).detach()


def _no_op(tensor: Tensor, hook) -> None:
    return None


def _problem_plan(problem: _EdgeProblem, strategy: str | None) -> EdgePlan:
    up, down = problem.up.clean, problem.down.clean
    return plan_edges(up.numel(), down.numel(), len(problem.down_nodes), len(problem.up_nodes), len(problem.alphas),
                      strategy, up.element_size(), up_positions=up[0, ..., 0].numel(), split_numel=problem.split_numel)


def _edge_plan(problem: _EdgeProblem, strategy: str | EdgePlan | None, calibrate: bool) -> EdgePlan:
    name = strategy.strategy if isinstance(strategy, EdgePlan) else strategy
    if name == "split" and problem.block is None:
        raise ValueError(f"strategy 'split' needs a segment that is one eval-mode open_clip Bottleneck without "
                         f"hooks or SAEs; here {problem.unsplittable}; use 'backward' or 'forward'")
    if isinstance(strategy, EdgePlan):
        return strategy
    plan = _problem_plan(problem, strategy)
    if not calibrate or strategy is not None:
        return plan
    up, down = problem.up.clean, problem.down.clean
    key = (problem.up.point, problem.down.point, tuple(up.shape), tuple(down.shape), len(problem.down_nodes),
           len(problem.up_nodes), len(problem.alphas), up.dtype, str(up.device), problem.block is None)
    if key not in _CALIBRATED:
        _CALIBRATED[key] = _calibrate(problem)
    return _CALIBRATED[key]


_CALIBRATED: dict[tuple, EdgePlan] = {}


def _trial_seconds(problem: _EdgeProblem, plan: EdgePlan, n_nodes: int) -> float:
    """Seconds `plan` takes on the first `n_nodes` nodes it loops over (split: all nodes) and its first
    group of path points."""
    trial = copy.copy(problem)
    trial.alphas = problem.alphas[:plan.step_chunk]
    if plan.strategy == "backward":
        trial.down_nodes = problem.down_nodes[:n_nodes]
    elif plan.strategy == "forward":
        trial.up_nodes = problem.up_nodes[:n_nodes]
    start = time.perf_counter()
    trial.run(plan)
    return time.perf_counter() - start


def _calibrate(problem: _EdgeProblem) -> EdgePlan:
    """Time each applicable strategy on a few nodes and the first group of path points, extrapolate to
    all nodes and groups, keep the fastest. Backward: 1 and up to 3 nodes (fixed forward + per-node
    VJP); forward: one chunk of tangents, times the number of chunks; split: all nodes."""
    seconds, plans = {}, {}
    for s in EDGE_STRATEGIES if problem.block is not None else ("backward", "forward"):
        plan = plans[s] = _problem_plan(problem, s)
        groups = math.ceil(len(problem.alphas) / plan.step_chunk)
        if s == "split":
            seconds[s] = groups * _trial_seconds(problem, plan, 0)
        elif s == "backward":
            n = min(len(problem.down_nodes), 3)
            one, more = _trial_seconds(problem, plan, 1), _trial_seconds(problem, plan, n)
            per_node = (more - one) / (n - 1) if n > 1 else one
            seconds[s] = groups * (one - per_node + per_node * len(problem.down_nodes))
        else:
            seconds[s] = groups * math.ceil(len(problem.up_nodes) / plan.chunk) * _trial_seconds(problem, plan, plan.chunk)
    best = min(seconds, key=lambda s: (seconds[s], s))
    return dataclasses.replace(plans[best], cost={f"{s}_s": round(v, 4) for s, v in seconds.items()})


def ig_edge_scores_in(model, images: Tensor, up: NodeSpace, down: NodeSpace, downstream_nodes: Sequence[int],
                 steps: int, upstream_nodes: Sequence[int] | None = None, strategy: str | EdgePlan | None = None,
                 calibrate: bool = False, rule: str = RIEMANN_RULE) -> Tensor:
    """[J, I] edge IG for downstream nodes `downstream_nodes` and upstream nodes `upstream_nodes`
    (None: all), by the plan the cost model (or calibration, or `strategy`) picks."""
    problem = _edge_problem(model, images, up, down, downstream_nodes, steps, upstream_nodes, rule)
    if problem.empty:  # no nodes, or steps == 1 (the only path point, alpha = 1, contributes 0)
        return up.clean.new_zeros(len(problem.down_nodes), len(problem.up_nodes))
    return problem.run(_edge_plan(problem, strategy, calibrate))


def _edge_problem(model, images: Tensor, up: NodeSpace, down: NodeSpace, downstream_nodes: Sequence[int],
                  steps: int, upstream_nodes: Sequence[int] | None, rule: str = RIEMANN_RULE) -> _EdgeProblem:
    down_nodes = torch.as_tensor(list(downstream_nodes), dtype=torch.long)
    up_nodes = torch.arange(up.n_nodes) if upstream_nodes is None else torch.as_tensor(list(upstream_nodes), dtype=torch.long)
    _check_node_indices(down_nodes, down, "downstream_nodes")
    _check_node_indices(up_nodes, up, "upstream_nodes")
    return _EdgeProblem(model, images, up, down, down_nodes, up_nodes, steps, rule)


def ig_edge_scores(model, images: Tensor, upstream: str, downstream: str, downstream_nodes: Sequence[int],
                   steps: int = 10, upstream_nodes: Sequence[int] | None = None, *,
                   strategy: str | EdgePlan | None = None, calibrate: bool = False,
                   rule: str = RIEMANN_RULE) -> Tensor:
    """The paper's edge scores between consecutive points (of `model.analysis_points()`, or of
    `component_points(model)` for ViT heads and MLP neurons), Tensor[len(downstream_nodes),
    len(upstream_nodes)] (all upstream nodes when None): m_j = mean over batch and positions of
    (f(ã)[:, j] - a_d[:, j])^2 with f the segment upstream -> downstream; g_j = mean of dm_j/dã at
    ã = (1 - s/steps)·a_u, s < steps; edge[j, i] = mean_b sum_positions (g_j ⊙ (0 - a_u))[:, i].

    Cost: one forward of the segment over (steps-1)*B examples, then either one VJP per downstream
    node ('backward'), one JVP per upstream node ('forward') or, for a ResNet bottleneck segment,
    its 3x3 conv over min(upstream, downstream) nodes in one batch ('split'). `plan_edges` picks the
    strategy from the node counts and activation sizes (deterministic); `calibrate=True` instead
    times each once per shape and keeps the fastest; `strategy` ('backward', 'forward', 'split' or
    an `EdgePlan`) forces. `rule` moves the path points as in `ig_node_scores`.
    """
    _check_consecutive(model, upstream, downstream)
    spaces = node_spaces(model, images, [upstream, downstream], None)
    return ig_edge_scores_in(model, images, spaces[upstream], spaces[downstream], downstream_nodes, steps, upstream_nodes,
                        strategy, calibrate, rule)


def ig_edge_plan(model, images: Tensor, upstream: str, downstream: str, downstream_nodes: Sequence[int],
                 steps: int = 10, upstream_nodes: Sequence[int] | None = None) -> EdgePlan:
    """The plan the cost model picks for `ig_edge_scores` with these arguments (its `cost` field the
    estimate per applicable strategy). Cost: one forward of the model up to `downstream`."""
    _check_consecutive(model, upstream, downstream)
    spaces = node_spaces(model, images, [upstream, downstream], None)
    problem = _edge_problem(model, images, spaces[upstream], spaces[downstream], downstream_nodes, steps, upstream_nodes)
    return _problem_plan(problem, None)


def reference_ig_edge_scores(model, images: Tensor, upstream: str, downstream: str,
                             downstream_nodes: Sequence[int], steps: int = 10) -> Tensor:
    """Slow reference for `ig_edge_scores`, the paper's algorithm: for each downstream node, rerun
    the full model from the pixels (the steps path copies batched) with point `upstream` replaced by
    the IG path, and take dm_j/dã (no early exit, as in the original code). Kept for tests and benchmarks/circuit_edges.py.
    Cost: len(downstream_nodes) full forward + backward passes over steps*B images."""
    _check_consecutive(model, upstream, downstream)
    acts = cache_points(model, images, [upstream, downstream])
    a_u, a_d = acts[upstream], acts[downstream]
    du, dd = node_dim(upstream, a_u.ndim), node_dim(downstream, a_d.ndim)
    n_pos = a_d.numel() // (a_d.shape[0] * a_d.shape[dd])
    repeat = lambda t: t.repeat(steps, *([1] * (t.ndim - 1)))  # noqa: E731
    alphas = torch.tensor([1 - s / steps for s in range(steps)], dtype=a_u.dtype, device=a_u.device)
    rows = []
    for j in downstream_nodes:
        path = (alphas.view(-1, *([1] * a_u.ndim)) * a_u[None]).flatten(0, 1).detach().requires_grad_(True)
        with torch.enable_grad():
            seen: list[Tensor] = []
            # Like the original code: the whole model runs (no early exit at the downstream point).
            model.run_with_hooks(image=repeat(images), fwd_hooks=[(upstream, lambda t, hook: path),
                                                                   (downstream, lambda t, hook: seen.append(t))])
            y = seen[0]
            m = ((y.select(dd, j) - repeat(a_d).select(dd, j)) ** 2).sum() / (len(images) * n_pos)
            (g,) = torch.autograd.grad(m, path)
        g = g.unflatten(0, (steps, len(images))).mean(0)
        rows.append(_position_sum((g * (0 - a_u)).movedim(du, -1)).mean(0))
    return torch.stack(rows).detach()
