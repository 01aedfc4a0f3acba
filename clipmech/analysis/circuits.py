"""Channel-, head-, neuron- and SAE-latent-level circuits of CLIP's image tower (paper §8.4), their
faithfulness, and the shared / unshared node sets of the causal test (`clipmech.analysis.controls`).

The paper ports sparse feature circuits (Marks et al.) to CNN channels with an identity dictionary:
node scores are zero-baseline IG of the summed true-class cosine logit at one point; an edge
u/i -> d/j is the IG, over point u, of the squared deviation of downstream node j from its clean
value. Its code reruns the full model once per downstream node. Here the segment u -> d runs once
(`HookedCLIP.forward_from`) and the edges come from one VJP per downstream node over that graph,
one JVP per upstream node or, when the segment is one ResNet bottleneck, its Jacobian split at the
3x3 convolution (`clipmech.analysis.bottleneck_edges`), whichever a cost model (`plan_edges`) finds
cheaper. No existing
circuit library handles CNNs or CLIP, hence our own code; graph similarity is in
`clipmech.analysis.circuit_similarity`.

Nodes of a point live on its node axis (`patching.node_dim`). With an SAE (any object with
`encode(x[..., C]) -> z[..., L]` and `decode(z) -> x`) the point's nodes are its latents and the
activation is rebuilt as decode(z) + error, the error held at its clean value (Marks et al.).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from clipmech.analysis.bottleneck_edges import bottleneck_edges, unsplittable_reason
from clipmech.analysis.patching import (Metric, cache_points, check_points, evaluate_metric,
                                        mean_gradient_along_path, node_dim, riemann_alphas, segment_fn,
                                        true_class_logit)
from clipmech.utils import atomic_torch_save, atomic_write_bytes, atomic_write_json

# The paper's path (1 - s/steps)·a, s = 0..steps-1, is the right Riemann rule from a zero baseline.
_PAPER_RULE = "right"


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


def _position_sum(x: Tensor) -> Tensor:
    """[B, C]: node-last values summed over positions."""
    return x.flatten(1, -2).sum(1) if x.ndim > 2 else x


def _spaces(model, images: Tensor, points: Sequence[str], saes: Mapping[str, Any] | None) -> dict[str, NodeSpace]:
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
def _node_scores(model, images: Tensor, labels: Tensor, head: Tensor, space: NodeSpace, steps: int,
                 internal_batch_size: int | None = None) -> Tensor:
    labels = torch.as_tensor(labels, device=images.device).long()
    if labels.shape != (len(images),):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {len(images)} images")

    run = segment_fn(model, space.point, images)

    def summed_logit(z: Tensor) -> Tensor:
        emb = run(space.activation(z))
        reps = len(z) // len(images)
        return evaluate_metric(true_class_logit(head, labels.repeat(reps), reduce="sum"), emb)

    z = space.clean
    g = mean_gradient_along_path(summed_logit, z, torch.zeros_like(z), riemann_alphas(steps, _PAPER_RULE),
                                 internal_batch_size)
    return _position_sum(g * (0 - z)).mean(0).abs().detach()


def ig_node_scores(model, images: Tensor, labels: Tensor, head: Tensor, point: str, steps: int = 10) -> Tensor:
    """The paper's node scores at `point`, Tensor[C]: metric = sum over the batch of the true-class
    cosine logit (`head` [K, D] normalised zero-shot rows, `labels` [B]); g = mean gradient at
    (1 - s/steps)·a, s = 0..steps-1; score[c] = |mean_b sum_positions (g ⊙ (0 - a))[:, c]|.

    Cost: steps*B examples forward+backward through the segment point -> embedding, one batch.
    """
    check_points(model, [point])
    space = NodeSpace(point, cache_points(model, images, [point])[point])
    return _node_scores(model, images, labels, head, space, steps)


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
                 up_nodes: Tensor, steps: int):
        self.model, self.up, self.down, self.steps = model, up, down, steps
        self.down_nodes, self.up_nodes = down_nodes.to(up.clean.device), up_nodes.to(up.clean.device)
        z = up.clean
        self.n = len(z)
        # At alpha = 1 the segment reproduces the clean downstream value, so m_j and its gradient are 0:
        # that path point is skipped (it still counts in the 1/steps average).
        self.alphas = torch.tensor(riemann_alphas(steps, _PAPER_RULE)[:-1], dtype=z.dtype, device=z.device)
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


def _edge_scores(model, images: Tensor, up: NodeSpace, down: NodeSpace, downstream_nodes: Sequence[int],
                 steps: int, upstream_nodes: Sequence[int] | None = None, strategy: str | EdgePlan | None = None,
                 calibrate: bool = False) -> Tensor:
    """[J, I] edge IG for downstream nodes `downstream_nodes` and upstream nodes `upstream_nodes`
    (None: all), by the plan the cost model (or calibration, or `strategy`) picks."""
    problem = _edge_problem(model, images, up, down, downstream_nodes, steps, upstream_nodes)
    if problem.empty:  # no nodes, or steps == 1 (the only path point, alpha = 1, contributes 0)
        return up.clean.new_zeros(len(problem.down_nodes), len(problem.up_nodes))
    return problem.run(_edge_plan(problem, strategy, calibrate))


def _edge_problem(model, images: Tensor, up: NodeSpace, down: NodeSpace, downstream_nodes: Sequence[int],
                  steps: int, upstream_nodes: Sequence[int] | None) -> _EdgeProblem:
    down_nodes = torch.as_tensor(list(downstream_nodes), dtype=torch.long)
    up_nodes = torch.arange(up.n_nodes) if upstream_nodes is None else torch.as_tensor(list(upstream_nodes), dtype=torch.long)
    _check_node_indices(down_nodes, down, "downstream_nodes")
    _check_node_indices(up_nodes, up, "upstream_nodes")
    return _EdgeProblem(model, images, up, down, down_nodes, up_nodes, steps)


def ig_edge_scores(model, images: Tensor, upstream: str, downstream: str, downstream_nodes: Sequence[int],
                   steps: int = 10, upstream_nodes: Sequence[int] | None = None, *,
                   strategy: str | EdgePlan | None = None, calibrate: bool = False) -> Tensor:
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
    an `EdgePlan`) forces.
    """
    _check_consecutive(model, upstream, downstream)
    spaces = _spaces(model, images, [upstream, downstream], None)
    return _edge_scores(model, images, spaces[upstream], spaces[downstream], downstream_nodes, steps, upstream_nodes,
                        strategy, calibrate)


def ig_edge_plan(model, images: Tensor, upstream: str, downstream: str, downstream_nodes: Sequence[int],
                 steps: int = 10, upstream_nodes: Sequence[int] | None = None) -> EdgePlan:
    """The plan the cost model picks for `ig_edge_scores` with these arguments (its `cost` field the
    estimate per applicable strategy). Cost: one forward of the model up to `downstream`."""
    _check_consecutive(model, upstream, downstream)
    spaces = _spaces(model, images, [upstream, downstream], None)
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


# ----------------------------------------------------------------------------------------- circuit
def node_name(point: str, index: int) -> str:
    """The paper's node id 'point/index'."""
    return f"{point}/{index}"


@dataclass
class Circuit:
    """A layered circuit: `points` in order; per point, `node_scores` [C] and the selected `nodes`
    (indices, best first); `edges` (upstream point, upstream node, downstream point, downstream
    node, signed score) between consecutive points; free-form `meta` (domain, class, model...)."""

    points: list[str]
    node_scores: dict[str, Tensor]
    nodes: dict[str, list[int]]
    edges: list[tuple[str, int, str, int, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def node_set(self, point: str | None = None) -> set[str]:
        """Node names ('point/index'), of one point or of all points."""
        pts = self.points if point is None else [point]
        return {node_name(p, i) for p in pts for i in self.nodes[p]}

    def edge_set(self) -> set[tuple[str, str]]:
        return {(node_name(u, i), node_name(d, j)) for u, i, d, j, _ in self.edges}

    def keep_masks(self) -> dict[str, Tensor]:
        """{point: bool [C]} True on circuit nodes."""
        out = {}
        for p in self.points:
            mask = torch.zeros(len(self.node_scores[p]), dtype=torch.bool)
            mask[self.nodes[p]] = True
            out[p] = mask
        return out

    def save(self, path: str | Path) -> Path:
        """Write `path`.json (points, nodes, edges, meta) and `path`.pt (node scores), atomically."""
        path = Path(path).with_suffix("")
        atomic_torch_save({p: s.detach().cpu() for p, s in self.node_scores.items()}, path.with_suffix(".pt"))
        atomic_write_json({"format": "clipmech.circuit/1", "points": self.points, "nodes": self.nodes,
                           "edges": [list(e) for e in self.edges], "meta": self.meta}, path.with_suffix(".json"))
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        path = Path(path).with_suffix("")
        for p in (path.with_suffix(".json"), path.with_suffix(".pt")):
            if not p.exists():
                raise FileNotFoundError(f"circuit file {p} is missing; write circuits with Circuit.save(path)")
        data = json.loads(path.with_suffix(".json").read_text())
        if data.get("format") != "clipmech.circuit/1":
            raise ValueError(f"{path.with_suffix('.json')} is not a clipmech circuit file")
        scores = torch.load(path.with_suffix(".pt"), map_location="cpu", weights_only=True)
        edges = [(u, int(i), d, int(j), float(w)) for u, i, d, j, w in data["edges"]]
        return cls(list(data["points"]), scores, {p: list(v) for p, v in data["nodes"].items()}, edges, data["meta"])

    def draw(self, path: str | Path | None = None, ax=None, max_nodes: int = 40):
        """Layered drawing: one column per point, selected nodes (at most `max_nodes` per column,
        best on top), edges coloured by sign (red +, blue -) with opacity ~ |score|. Writes a PNG
        atomically when `path` is given. Returns the matplotlib Figure."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(self.points)), 6))
        fig = fig or ax.figure
        pos = {}
        for x, p in enumerate(self.points):
            shown = self.nodes[p][:max_nodes]
            for r, i in enumerate(shown):
                pos[node_name(p, i)] = (x, 1 - (r + 0.5) / max(len(shown), 1))
        wmax = max((abs(w) for *_, w in self.edges), default=1.0) or 1.0
        for u, i, d, j, w in self.edges:
            a, b = pos.get(node_name(u, i)), pos.get(node_name(d, j))
            if a and b:
                ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:red" if w >= 0 else "tab:blue",
                        alpha=0.15 + 0.85 * abs(w) / wmax, lw=0.8)
        xs, ys = zip(*pos.values()) if pos else ((), ())
        ax.scatter(xs, ys, s=12, color="black", zorder=3)
        ax.set_xticks(range(len(self.points)))
        ax.set_xticklabels([_short(p) for p in self.points], rotation=60, ha="right", fontsize=7)
        ax.set_yticks([])
        title = " / ".join(str(self.meta[k]) for k in ("domain", "class") if k in self.meta)
        ax.set_title(f"circuit {title}".strip())
        fig.tight_layout()
        if path is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=120)
            atomic_write_bytes(buf.getvalue(), path)
            plt.close(fig)
        return fig


def _short(point: str) -> str:
    return point.replace("visual.", "").replace("hook_", "")


def component_points(model) -> list[str]:
    """ViT circuit points with heads and MLP neurons as nodes: per block, attn.hook_z then
    mlp.hook_post (in forward order)."""
    names = list(model.hook_names())
    pts = [n for n in names if n.startswith("visual.blocks.") and n.endswith(("attn.hook_z", "mlp.hook_post"))]
    if not pts:
        raise ValueError("component_points needs a ViT image tower (no visual.blocks.*.attn.hook_z hooks found)")
    return pts


def discover_circuit(model, images: Tensor, labels: Tensor, head: Tensor, *, points: Sequence[str] | None = None,
                     node_fraction: float = 0.1, top_k: int = 3, steps: int = 10,
                     saes: Mapping[str, Any] | None = None, strategy: str | None = None, calibrate: bool = False,
                     meta: dict[str, Any] | None = None) -> Circuit:
    """The paper's circuit for one (domain, class) batch: per point the top ceil(node_fraction·C)
    nodes by `ig_node_scores`; for each consecutive pair (u, d) and each selected downstream node,
    the `top_k` selected upstream nodes by SIGNED edge score. Pairs are only (points[i],
    points[i+1]); no wrap-around from the last point to the first (paper §12).

    `points` default to model.analysis_points(); `component_points(model)` gives ViT heads and MLP
    neurons; `saes` {point: sae} makes that point's nodes SAE latents; `strategy` / `calibrate` as in
    `ig_edge_scores` (a forced 'split' needs every pair to be one ResNet bottleneck; the cost model
    picks it wherever it applies). Cost: len(points) node IGs plus one edge IG per pair over the
    selected nodes only (one segment forward, then a VJP per selected downstream node, a JVP per
    selected upstream node or the bottleneck split, whichever the cost model finds cheapest).
    `top_k=0`: nodes only, no edge IG (about half the cost on tiny-rn; what node ablations need).
    """
    points = list(model.analysis_points() if points is None else points)
    check_points(model, points)
    order = list(model.hook_names())
    if [order.index(p) for p in points] != sorted(order.index(p) for p in points) or len(set(points)) != len(points):
        raise ValueError(f"circuit points must be distinct and in forward order; got {points}")
    if not 0 < node_fraction <= 1:
        raise ValueError(f"node_fraction must be in (0, 1], got {node_fraction}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 edges per node (0: nodes only), got {top_k}")
    spaces = _spaces(model, images, points, saes)
    scores, nodes = {}, {}
    for p in points:
        scores[p] = _node_scores(model, images, labels, head, spaces[p], steps)
        k = math.ceil(node_fraction * len(scores[p]))
        nodes[p] = [int(i) for i in torch.argsort(scores[p], descending=True, stable=True)[:k]]
    edges = []
    for u, d in zip(points[:-1], points[1:]) if top_k else ():
        mat = _edge_scores(model, images, spaces[u], spaces[d], nodes[d], steps, nodes[u], strategy, calibrate)
        for row, j in zip(mat, nodes[d]):
            for col in torch.argsort(row, descending=True, stable=True)[:top_k]:
                edges.append((u, nodes[u][int(col)], d, j, float(row[col])))
    info = {"n_images": len(images), "steps": steps, "node_fraction": node_fraction, "top_k": top_k,
            "saes": sorted(saes or {})}
    return Circuit(points, {p: s.cpu() for p, s in scores.items()}, nodes, edges, {**info, **(meta or {})})


# ------------------------------------------------------------------------------------ ablations
def ablation_values(model, reference: Tensor, points: Sequence[str], ablation: str = "mean",
                    saes: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """{point: node values [..., C] of one example} that ablated nodes take: zeros ('zero') or the
    mean over the `reference` images ('mean'). Cost: one forward over `reference`."""
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    spaces = _spaces(model, reference, list(points), saes)
    return {p: s.clean.mean(0) if ablation == "mean" else torch.zeros_like(s.clean[0]) for p, s in spaces.items()}


def ablated_embedding(model, images: Tensor, keep: Mapping[str, Tensor], *, ablation: str = "mean",
                      reference: Tensor | None = None, saes: Mapping[str, Any] | None = None,
                      fill: Mapping[str, Tensor] | None = None) -> Tensor:
    """Unnormalised embeddings [B, D] with, at every point of `keep` ({point: bool [C]}), the nodes
    where keep is False replaced by zero ('zero') or by their mean over `reference` images ('mean',
    default reference = `images`); `fill` (from `ablation_values`) skips recomputing those values.
    All points are ablated in the same forward pass."""
    points = list(keep)
    check_points(model, points)
    saes = dict(saes or {})
    if fill is None:
        fill = ablation_values(model, images if reference is None else reference, points, ablation, saes)

    def hook(t: Tensor, hook) -> Tensor:
        p = hook.name
        space = NodeSpace(p, t.detach(), saes.get(p))
        mask = keep[p].to(t.device)
        if mask.shape != (space.n_nodes,):
            raise ValueError(f"keep mask for {p!r} has shape {tuple(mask.shape)}, expected ({space.n_nodes},)")
        return space.activation(torch.where(mask, space.nodes(t), fill[p]))

    embed: list[Tensor] = []
    with torch.no_grad():
        model.run_with_hooks(image=images, fwd_hooks=[(p, hook) for p in points] +
                             [("hook_image_embed", lambda t, hook: embed.append(t))])
    return embed[-1]


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


# ------------------------------------------------------------------- faithfulness over circuit sizes
FAITHFULNESS_SIZES = (1, 2, 5, 10, 20, 50, 100)  # % of nodes kept per point (MIB-style sweep)
FAITHFULNESS_EPS = 1e-3  # |m(N) - m(empty)| below this: f undefined, the cell is skipped and counted


@torch.no_grad()
def resample_values(model, donors: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
    """{point: node values [B, ..., C]}: resample ablation, image b's ablated nodes take donor b's
    values (e.g. a same-domain drawing of another class). Cost: one forward over `donors`."""
    return {p: s.clean for p, s in _spaces(model, donors, list(points), None).items()}


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
                       sizes: Sequence[float] = FAITHFULNESS_SIZES, eps: float = FAITHFULNESS_EPS) -> dict[str, Any]:
    """f(x) = (m(C_x) - m(empty)) / (m(N) - m(empty)) for the circuit's top x % nodes per point (x in
    `sizes`), everything else at every point replaced by `fill` (from `ablation_values`, or
    `resample_values` for resample ablation); m = mean true-class cosine logit of `images` (held out
    from discovery). `points` default to the circuit's points except the pixel input. Returns
    {"sizes", "f", "auc", "distance", "m_full", "m_empty"}, with f and the areas None and a "skipped"
    reason when |m(N) - m(empty)| < eps. Cost: len(sizes) + 1 forwards."""
    points = [p for p in circuit.points if not p.endswith("hook_input")] if points is None else list(points)
    metric = true_class_logit(head, labels)
    full = {p: torch.ones(len(circuit.node_scores[p]), dtype=torch.bool) for p in points}
    m = lambda keep: float(evaluate_metric(metric, ablated_embedding(model, images, keep, fill=fill)))  # noqa: E731
    m_empty = m({p: ~k for p, k in full.items()})
    values = {x: m(top_fraction_masks(circuit, x, points)) for x in sizes}
    m_full = values[100] if 100 in values else m(full)
    out: dict[str, Any] = {"sizes": list(sizes), "m_full": m_full, "m_empty": m_empty, "f": None, "auc": None,
                           "distance": None}
    if abs(m_full - m_empty) < eps:
        out["skipped"] = f"|m(N) - m(empty)| = {abs(m_full - m_empty):.2g} < eps = {eps:g}"
        return out
    out["f"] = [(values[x] - m_empty) / (m_full - m_empty) for x in sizes]
    return out | curve_areas(sizes, out["f"])


# ----------------------------------------------------------------------------- shared nodes
def shared_nodes(circuits: Mapping[str, Mapping[str, Circuit]], test_domain: str, classes: Sequence[str],
                 points: Sequence[str]) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Per point, nodes of the test domain's circuits (over `classes`) that also occur in the same
    class's circuit of some other domain (shared), and the rest (unshared, disjoint from shared).
    `circuits[domain][class]`."""
    if test_domain not in circuits:
        raise KeyError(f"no circuits for test domain {test_domain!r}; have {sorted(circuits)}")
    others = [d for d in circuits if d != test_domain]
    if not others:
        raise ValueError("the shared-node test needs circuits of at least one domain besides the test domain")
    shared = {p: set() for p in points}
    mine = {p: set() for p in points}
    for k in classes:
        if k not in circuits[test_domain]:
            raise KeyError(f"no circuit of class {k!r} for test domain {test_domain!r}")
        for p in points:
            own = set(circuits[test_domain][k].nodes[p])
            other = set().union(*(circuits[d][k].nodes[p] for d in others if k in circuits[d]))
            mine[p] |= own
            shared[p] |= own & other
    return shared, {p: mine[p] - shared[p] for p in points}
