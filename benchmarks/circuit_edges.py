"""Edge-IG wall time, side by side on the same inputs: the paper's loop (full-model rerun per
downstream node), the plain loop over the segment (one forward of u -> d, one
`autograd.grad(retain_graph=True)` per downstream node: the fair baseline) and clipmech's
`ig_edge_scores` (the plan `plan_edges` picks: that same loop, vmapped JVPs over the upstream nodes, or
for ResNet bottleneck segments the Jacobian split at the 3x3 conv). Nodes as in a circuit: the top 10% of
each point (the first ceil(C/10) channels here; which ones does not change the cost).

Per pair it prints CPU seconds of this process per column (`--threads 1` by default, so they are
the work done, not the waiting on a shared machine): the paper's loop once, the plain loop and clipmech best of
`--repeats` rounds, interleaved and alternating which goes first (so machine load hits both alike);
the measured ratios, the cost model's predicted plain/ours ratio and the largest
difference to the plain loop relative to max |score|. `--paper-nodes K` times the paper's loop on K
downstream nodes per pair and scales it by J/K (its per-node reruns are independent, so this is
linear); `--pairs representative` times one pair per distinct (upstream shape, downstream shape)
and counts it once per pair of that shape (RN50: 13 of 21). The total is then extrapolated to one
model's 2,070 circuits (6 domains x 345 classes) at the paper's 50 images: edge IG only, scaled by
50 / images (segment cost is linear in the batch once kernels are large; an underestimate for tiny
batches).

Measured 2026-11-29 (CPU seconds, one thread, 8 images, machine shared; README has the table):
plain/clipmech 2.28x tiny-rn, 2.46x at RN50 depth (split: 2.1-3.5x per bottleneck pair; the stem and
attention-pool pairs keep the plain loop), 1.51x tiny-vit components; paper/clipmech 27.4x, 62.2x, 13.0x.

    python benchmarks/circuit_edges.py [--model tiny-rn] [--layers 3,4,6,3] [--images 16] [--steps 10]
        [--points analysis|components] [--pairs all|representative] [--paper-nodes K] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from clipmech.analysis.circuits import (component_points, ig_edge_plan, ig_edge_scores, plan_edges,
                                        reference_ig_edge_scores)
from clipmech.analysis.patching import cache_points, node_dim
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config

CIRCUITS_PER_MODEL = 2070
PAPER_IMAGES = 50


def _timed(fn):
    """(CPU seconds of this process, result): on a shared machine, wall time mostly measures the
    other processes; with --threads 1 CPU time is the work done."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def _pairs(points: list[str], shapes: dict[str, tuple], mode: str) -> list[tuple[str, str, int]]:
    """(u, d, how many pairs it stands for)."""
    pairs = list(zip(points[:-1], points[1:]))
    if mode == "all":
        return [(u, d, 1) for u, d in pairs]
    groups: dict[tuple, list] = {}
    for u, d in pairs:
        groups.setdefault((shapes[u], shapes[d]), []).append((u, d))
    return [(members[0][0], members[0][1], len(members)) for members in groups.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--layers", default=None, help="blocks per ResNet stage, e.g. 3,4,6,3 (RN50's depth)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", choices=["analysis", "components"], default="analysis",
                    help="components: ViT heads and MLP neurons (component_points)")
    ap.add_argument("--pairs", choices=["all", "representative"], default="all")
    ap.add_argument("--paper-nodes", type=int, default=None, help="time the paper's loop on this many nodes per pair")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = args.model
    if args.layers:
        _, cfg = resolve_config(args.model)
        cfg["vision_cfg"]["layers"] = [int(n) for n in args.layers.split(",")]
    model = HookedCLIP.from_config(cfg).eval()
    images = torch.randn(args.images, 3, model.image_size, model.image_size)
    points = component_points(model) if args.points == "components" else model.analysis_points()
    acts = cache_points(model, images, points)
    shapes = {p: tuple(a.shape) for p, a in acts.items()}
    width = {p: a.shape[node_dim(p, a.ndim)] for p, a in acts.items()}
    n_points = args.steps - 1
    totals = dict.fromkeys(("paper", "plain", "ours"), 0.0)
    print(f"{args.model}{' layers ' + args.layers if args.layers else ''}: {len(points)} points, {args.images} images, "
          f"{args.steps} steps, {args.threads} threads, best of {args.repeats}"
          + (f", paper loop timed on {args.paper_nodes} node(s)/pair and scaled" if args.paper_nodes else ""))
    print(f"{'pair':<48} {'x':>2} {'J':>4} {'I':>4} {'plan':<13} {'paper s':>8} {'plain s':>8} {'ours s':>8} "
          f"{'plain/ours':>10} {'predicted':>9} {'paper/ours':>10} {'max diff':>8}")
    for u, d, count in _pairs(points, shapes, args.pairs):
        down = list(range(math.ceil(0.1 * width[d])))
        up = list(range(math.ceil(0.1 * width[u])))
        numel = (acts[u].numel(), acts[d].numel())
        positions = acts[u][0].numel() // width[u]
        auto = ig_edge_plan(model, images, u, d, down, args.steps, up)
        plain_plan = plan_edges(*numel, len(down), len(up), n_points, strategy="backward", up_positions=positions)
        paper_nodes = down[:args.paper_nodes] if args.paper_nodes else down
        out: dict[str, torch.Tensor] = {}
        best = dict.fromkeys(totals, math.inf)
        t, paper = _timed(lambda: reference_ig_edge_scores(model, images, u, d, paper_nodes, steps=args.steps))
        best["paper"] = t * len(down) / len(paper_nodes)
        runs = {"plain": lambda: ig_edge_scores(model, images, u, d, down, args.steps, up, strategy=plain_plan),
                "ours": lambda: ig_edge_scores(model, images, u, d, down, args.steps, up)}
        for r in range(args.repeats):
            for side in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):  # alternate who goes first
                t, out[side] = _timed(runs[side])
                best[side] = min(best[side], t)
        plain, ours = out["plain"], out["ours"]
        scale = float(plain.abs().max().clamp_min(1e-30))
        diff = max(float((ours - plain).abs().max()),
                   float((paper[:, up] - plain[:len(paper_nodes)]).abs().max())) / scale
        for k in totals:
            totals[k] += count * best[k]
        predicted = auto.cost["backward"] / auto.cost[auto.strategy]
        plan = f"{auto.strategy[:3]} k={auto.chunk} p={auto.step_chunk}"
        name = f"{u.replace('visual.', '')} -> {d.replace('visual.', '')}"
        print(f"{name:<48} {count:>2} {len(down):>4} {len(up):>4} {plan:<13} {best['paper']:>8.3f} {best['plain']:>8.3f} "
              f"{best['ours']:>8.3f} {best['plain'] / best['ours']:>10.2f} {predicted:>9.2f} "
              f"{best['paper'] / best['ours']:>10.1f} {diff:>8.1e}", flush=True)
    print(f"total (pairs x count): paper {totals['paper']:.2f} s, plain {totals['plain']:.2f} s, ours {totals['ours']:.2f} s;"
          f" plain/ours {totals['plain'] / totals['ours']:.2f}x, paper/ours {totals['paper'] / totals['ours']:.1f}x")
    per_model = {k: v * PAPER_IMAGES / args.images * CIRCUITS_PER_MODEL / 3600 for k, v in totals.items()}
    print(f"one model's {CIRCUITS_PER_MODEL} circuits at {PAPER_IMAGES} images (edge IG, scaled from {args.images} "
          f"images): paper {per_model['paper']:.1f} h, plain {per_model['plain']:.1f} h, ours {per_model['ours']:.1f} h "
          f"(CPU seconds, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
