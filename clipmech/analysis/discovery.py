"""Circuit discovery methods side by side on one segment u -> d (`edge_ablation.Segment`): node
scores at both points and edge scores [J, I] for the same batch, one call shape for every method.

Methods (`METHODS`; higher score = more important; node and edge scores use the segment's ablation
value u0 / d0 wherever a method needs a counterfactual):
- paper_ig: the paper's zero-baseline node IG and its edge IG between the selected nodes
  (`clipmech.analysis.engine_adapter`, the one adapter to the IG engine).
- eap: attribution patching, |mean_b sum_pos (a0 - a) . dm/da| at the clean run; an edge (i, j)
  takes the gradient through node j only: |mean_b sum_pos (u0 - u)_i . d<g_j, d_j>/du_i|, g = dm/dd.
- eap_ig: EAP-IG with input-space interpolation: the same products with the gradients averaged over
  inputs x0 + alpha (x - x0), alpha at the midpoints of `steps` intervals, x0 the segment's
  baseline images (zeros, the reference mean image or the donors).
- mask: a learned node mask (continuous sigmoid relaxation, u' = s u + (1 - s) u0 at both points,
  loss ((m(mask) - m(N)) / (m(N) - m(empty)))^2 + lam * mean(s), Adam); an edge scores the product
  of its end nodes' mask values (an edge mask needs J copies of the segment per step).
- exact: exact activation patching, |m(node ablated) - m(N)| per node, and per edge the exact edge
  ablation of `edge_ablation` where affordable (at most `exact_budget` (i, j) pairs whose d_j moves).
- random: uniform random scores (seeded), the chance baseline.
Costs are measured per call (`MethodScores.seconds`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from clipmech.analysis.edge_ablation import ROW_CHUNK, Segment, _node_last, _stack
from clipmech.analysis.engine_adapter import (Circuit, ablation_values, cache_points, check_points, paper_ig_scores,
                                              riemann_alphas, true_class_logit)

METHODS = ("paper_ig", "eap", "eap_ig", "mask", "exact", "random")
CIRCUIT_METHODS = ("paper_ig", "eap_ig")  # whole-tower circuits a study can discover (`eap_ig_circuit`)
EXACT_BUDGET = 20_000  # (i, j) pairs whose d_j moves; beyond that exact edge patching is skipped
CHANGE_TOL = 1e-6  # |d_j change| <= tol * max|d|: the edge does not move d_j (batched-kernel rounding)
MASK_STEPS, MASK_LR, MASK_PENALTY = 200, 0.1, 0.05


@dataclass
class MethodScores:
    """One method's scores on one segment: `nodes` {point: [C]}, `edges` [J, I] (None where the
    method was not affordable, `note` says why), wall-clock `seconds`."""

    method: str
    nodes: dict[str, Tensor]
    edges: Tensor | None
    seconds: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        def lst(t: Tensor) -> list:
            return t.double().nan_to_num(neginf=-1e300).tolist()
        return {"method": self.method, "seconds": self.seconds, "note": self.note,
                "nodes": {p: lst(s) for p, s in self.nodes.items()},
                "edges": None if self.edges is None else lst(self.edges)}


def _sum_positions(x: Tensor) -> Tensor:
    """[B, ..., C] -> [C]: summed over positions, mean over the batch."""
    return x.flatten(1, -2).sum(1).mean(0) if x.ndim > 2 else x.mean(0)


def _gradients(seg: Segment, u: Tensor) -> tuple[Tensor, Tensor]:
    """(dm/du, dm/dd) at node-last upstream values `u` [B, ..., I]."""
    x = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        d = seg.forward(x)
        # autograd.grad, not backward: the model's weight gradients are neither needed nor kept.
        g_u, g_d = torch.autograd.grad(seg.value(d), [x, d])
    return g_u, g_d


def _edge_products(seg: Segment, u: Tensor, g_d: Tensor, rows: Tensor | None = None) -> Tensor:
    """[len(rows), I] (default rows: all J): mean_b sum_pos (u0 - u_clean)_i . d<g_j, d_j>/du_i at
    upstream values `u`, one VJP per downstream node j of `rows` (`ROW_CHUNK` nodes per run, each a
    copy of the batch)."""
    rows = torch.arange(seg.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    delta = (seg.u0 - seg.u).expand_as(seg.u)
    out = torch.zeros(len(rows), seg.shape[1], dtype=seg.u.dtype)
    for start in range(0, len(rows), ROW_CHUNK):
        chunk = rows[start:start + ROW_CHUNK]
        x = _stack(u.detach(), len(chunk)).requires_grad_(True)
        with torch.enable_grad():
            y = seg.forward(x)
        cot = torch.zeros_like(y).unflatten(0, (len(chunk), -1))
        for r, j in enumerate(chunk.tolist()):
            cot[r, ..., j] = g_d[..., j]
        (g,) = torch.autograd.grad(y, x, cot.flatten(0, 1))
        out[start:start + len(chunk)] = torch.stack([_sum_positions(gr * delta)
                                                     for gr in g.unflatten(0, (len(chunk), -1))])
    return out


def eap_scores(seg: Segment) -> tuple[dict[str, Tensor], Tensor]:
    """Attribution patching at the clean run (module docstring). Cost: 1 forward + backward, then
    one VJP of the segment per downstream node."""
    g_u, g_d = _gradients(seg, seg.u)
    nodes = {seg.upstream: _sum_positions((seg.u0 - seg.u) * g_u).abs(),
             seg.downstream: _sum_positions((seg.d0 - seg.d) * g_d).abs()}
    return nodes, _edge_products(seg, seg.u, g_d).abs()


def eap_ig_scores(seg: Segment, steps: int = 5, rows: Tensor | None = None,
                  edges: bool = True) -> tuple[dict[str, Tensor], Tensor | None]:
    """EAP-IG with input-space interpolation (module docstring); edge scores [len(rows), I] into the
    downstream nodes `rows` only (default all J), none with `edges=False`. Cost: `steps` times
    EAP's (the edge part in proportion to len(rows))."""
    g_u, g_d, scores = 0, 0, 0
    x0 = seg.baseline_images
    for alpha in riemann_alphas(steps, "midpoint"):
        act = cache_points(seg.model, x0 + alpha * (seg.images - x0), [seg.upstream])[seg.upstream]
        u_alpha = _node_last(seg.upstream, act)
        gu, gd = _gradients(seg, u_alpha)
        g_u, g_d = g_u + gu / steps, g_d + gd / steps
        if edges:
            scores = scores + _edge_products(seg, u_alpha, gd, rows) / steps
    nodes = {seg.upstream: _sum_positions((seg.u0 - seg.u) * g_u).abs(),
             seg.downstream: _sum_positions((seg.d0 - seg.d) * g_d).abs()}
    return nodes, scores.abs() if edges else None


def _ablated_copies(clean: Tensor, value: Tensor, nodes: Tensor) -> Tensor:
    """[k*B, ..., C]: copy r of the batch with node nodes[r] set to its ablation value."""
    x = _stack(clean, len(nodes)).unflatten(0, (len(nodes), -1)).clone()
    value = value.expand_as(clean)
    for r, i in enumerate(nodes.tolist()):
        x[r, ..., i] = value[..., i]
    return x.flatten(0, 1)


@torch.no_grad()
def exact_scores(seg: Segment, budget: int = EXACT_BUDGET) -> tuple[dict[str, Tensor], Tensor | None, str]:
    """Exact node patching at both points and exact edge ablation where affordable (module
    docstring). Cost: I + J segment / readout runs for the nodes, then one readout per (i, j) pair
    whose d_j moves when u_i is ablated (skipped beyond `budget` pairs)."""
    n_down, n_up = seg.shape
    base = float(seg.value(seg.d))
    up, moved = [], []
    tol = CHANGE_TOL * float(seg.d.abs().max())
    for start in range(0, n_up, ROW_CHUNK):
        nodes = torch.arange(start, min(start + ROW_CHUNK, n_up))
        out = seg.forward(_ablated_copies(seg.u, seg.u0, nodes))
        up.append(seg.values(out) - base)
        moved.append(out.unflatten(0, (len(nodes), -1)))
    down = [seg.values(_ablated_copies(seg.d, seg.d0, torch.arange(s, min(s + ROW_CHUNK, n_down)))) - base
            for s in range(0, n_down, ROW_CHUNK)]
    node_scores = {seg.upstream: torch.cat(up).abs(), seg.downstream: torch.cat(down).abs()}
    moved = torch.cat(moved)  # [I, B, ..., J]
    change = (moved - seg.d[None]).abs().flatten(1, -2).amax(1) > tol  # [I, J]
    pairs = torch.nonzero(change)
    if len(pairs) > budget:
        return node_scores, None, f"exact edges skipped: {len(pairs)} moving pairs > budget {budget}"
    edges = torch.zeros(n_down, n_up, dtype=seg.u.dtype)
    for start in range(0, len(pairs), ROW_CHUNK):
        chunk = pairs[start:start + ROW_CHUNK]
        d = _stack(seg.d, len(chunk)).unflatten(0, (len(chunk), -1)).clone()
        for r, (i, j) in enumerate(chunk.tolist()):
            d[r, ..., j] = moved[i, ..., j]
        edges[chunk[:, 1], chunk[:, 0]] = (seg.values(d.flatten(0, 1)) - base).abs().to(edges)
    return node_scores, edges, ""


def mask_scores(seg: Segment, steps: int = MASK_STEPS, lr: float = MASK_LR, penalty: float = MASK_PENALTY
                ) -> tuple[dict[str, Tensor], Tensor]:
    """Learned node mask (module docstring); the scores are the final mask values. Cost: `steps`
    forward + backward passes of the segment and readout."""
    n_down, n_up = seg.shape
    theta_u = torch.full((n_up,), 3.0, dtype=seg.u.dtype, requires_grad=True)
    theta_d = torch.full((n_down,), 3.0, dtype=seg.u.dtype, requires_grad=True)
    with torch.no_grad():
        m_full = float(seg.value(seg.d))
        m_empty = float(seg.value(seg.d0.expand_as(seg.d)))
    gap = m_full - m_empty if abs(m_full - m_empty) > 1e-12 else 1.0
    opt = torch.optim.Adam([theta_u, theta_d], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            su, sd = torch.sigmoid(theta_u), torch.sigmoid(theta_d)
            d = seg.forward(su * seg.u + (1 - su) * seg.u0)
            m = seg.value(sd * d + (1 - sd) * seg.d0)
            loss = ((m - m_full) / gap) ** 2 + penalty * torch.cat([su, sd]).mean()
            theta_u.grad, theta_d.grad = torch.autograd.grad(loss, [theta_u, theta_d])
            opt.step()
    su, sd = torch.sigmoid(theta_u).detach(), torch.sigmoid(theta_d).detach()
    return {seg.upstream: su, seg.downstream: sd}, sd[:, None] * su[None]


def random_scores(seg: Segment, seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Uniform random node and edge scores (the chance baseline)."""
    gen = torch.Generator().manual_seed(seed)
    n_down, n_up = seg.shape
    return ({seg.upstream: torch.rand(n_up, generator=gen), seg.downstream: torch.rand(n_down, generator=gen)},
            torch.rand(n_down, n_up, generator=gen))


def discover(seg: Segment, method: str, *, steps: int = 10, node_fraction: float = 0.1, seed: int = 0,
             mask_steps: int = MASK_STEPS, exact_budget: int = EXACT_BUDGET) -> MethodScores:
    """Node and edge scores of `method` (one of `METHODS`) on `seg`, timed. `steps`: IG path
    points (paper_ig) and input interpolation points (eap_ig, half of them)."""
    start = time.perf_counter()
    note = ""
    if method == "paper_ig":
        nodes, edges = paper_ig_scores(seg.model, seg.images, seg.labels, seg.head, seg.upstream, seg.downstream,
                                       steps=steps, node_fraction=node_fraction)
    elif method == "eap":
        nodes, edges = eap_scores(seg)
    elif method == "eap_ig":
        nodes, edges = eap_ig_scores(seg, max(1, steps // 2))
    elif method == "mask":
        nodes, edges = mask_scores(seg, mask_steps)
    elif method == "exact":
        nodes, edges, note = exact_scores(seg, exact_budget)
    elif method == "random":
        nodes, edges = random_scores(seg, seed)
    else:
        raise ValueError(f"unknown discovery method {method!r}; choose one of {METHODS}")
    nodes = {p: s.detach().cpu() for p, s in nodes.items()}
    edges = None if edges is None else edges.detach().cpu()
    return MethodScores(method, nodes, edges, time.perf_counter() - start, note)


def eap_ig_circuit(model, images: Tensor, labels: Tensor, head: Tensor, reference: Tensor, *,
                   points: Sequence[str] | None = None, node_fraction: float = 0.1, edges: bool = True,
                   top_k: int = 3, steps: int = 10, fill: Mapping[str, Tensor] | None = None,
                   meta: dict[str, Any] | None = None) -> Circuit:
    """The circuit of one (domain, class) batch found by EAP-IG instead of the paper's IG, in the
    shape of `clipmech.analysis.circuit.discover_circuit`: per point the top ceil(node_fraction * C)
    nodes by EAP-IG node score; with `edges`, for each consecutive pair (u, d) and each selected
    downstream node, the `top_k` selected upstream nodes by EAP-IG edge score. The counterfactual is
    mean ablation over the `reference` images (their mean node values, or `fill` from
    `ablation_values`) and their mean image is the input-space baseline; steps // 2 interpolation
    points, as `discover`. Scores are magnitudes (EAP-IG ranks |effect|), stored as the circuit's
    node scores. Cost per consecutive pair: steps // 2 x (forward to u, then segment and readout
    forward + backward), twice with `edges`, plus one segment VJP per selected downstream node."""
    points = list(model.analysis_points() if points is None else points)
    check_points(model, points)
    if len(points) < 2:
        raise ValueError(f"an EAP-IG circuit needs at least 2 points (one segment); got {points}")
    if not 0 < node_fraction <= 1:
        raise ValueError(f"node_fraction must be in (0, 1], got {node_fraction}")
    labels = torch.as_tensor(labels).long()
    fill = ablation_values(model, reference, points, "mean") if fill is None else fill
    metric = true_class_logit(head, labels, reduce="sum")
    segs = [Segment.build(model, images, u, d, head, labels, metric, "mean", reference, fill=fill)
            for u, d in zip(points[:-1], points[1:])]
    n_alpha = max(1, steps // 2)
    scores: dict[str, Tensor] = {}
    for seg in segs:  # a point's node score is the same from either segment it ends; take it once
        nodes, _ = eap_ig_scores(seg, n_alpha, edges=False)
        scores.setdefault(seg.upstream, nodes[seg.upstream].detach().cpu())  # CPU: edge rows are indexed on CPU
        scores[seg.downstream] = nodes[seg.downstream].detach().cpu()
    selected = {p: torch.argsort(s, descending=True, stable=True)[:math.ceil(node_fraction * len(s))]
                for p, s in scores.items()}
    found = []
    for seg in segs if edges else ():
        up, down = selected[seg.upstream], selected[seg.downstream]
        _, mat = eap_ig_scores(seg, n_alpha, rows=down)
        mat = mat[:, up]
        for row, j in zip(mat, down.tolist()):
            for col in torch.argsort(row, descending=True, stable=True)[:top_k]:
                found.append((seg.upstream, int(up[col]), seg.downstream, j, float(row[col])))
    info = {"n_images": len(images), "steps": steps, "node_fraction": node_fraction, "top_k": top_k if edges else 0,
            "method": "eap_ig", "ablation": "mean", "saes": []}
    return Circuit(points, scores, {p: [int(i) for i in s] for p, s in selected.items()}, found,
                   {**info, **(meta or {})})
