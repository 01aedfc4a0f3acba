"""Edge-IG wall time: the paper's per-downstream-node loop (full-model rerun per node) against
clipmech's vectorized `ig_edge_scores` (one segment forward + batched VJPs), side by side in one
run on a random tiny ResNet CLIP, over every consecutive pair of analysis points with the top 10%
of downstream channels (as in a circuit). Prints per-pair and total times and the ratio naive/ours.

Both compute the same numbers (max relative difference printed). Per downstream node the naive loop
pays a full-model forward plus a segment backward; ours pays one segment VJP inside a vmap batch.
The ratio is therefore bounded by about (full forward + segment backward) / segment backward, which
grows with depth: measured on an idle 2-core CPU (2026-11-29), tiny-rn (one block per stage,
10 points) 4.2x; the same width at RN50's depth (`--layers 3,4,6,3`, 22 points) 11.3x overall and
19-20x on layer4 pairs. On CPU, vmap over one-hot cotangents runs convolution, batch-norm and
avg-pool backward per slice (torch.profiler: 56 convolution_backward calls for 4 convolutions at
13 nodes, 28% of the time in the concatenation), so `ig_edge_scores` batches 8 nodes per VJP
(`EDGE_CHUNK`): 1.2-1.4x faster than one batch of all nodes (tiny-rn: 3.2x -> 4.2x overall) and
within 10-30% of one-node batches. A plain backward per node (a Python loop, which the spec rules
out) would be 2-3x cheaper still (layer1 -> layer2: 0.012-0.017 s vs 0.036-0.042 s per node) and
would still leave that pair near 6-7x. GPU timings not measured: no GPU was available.

    python benchmarks/circuit_edges.py [--images 16] [--steps 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from clipmech.analysis.circuits import ig_edge_scores, reference_ig_edge_scores
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--layers", default=None,
                    help="blocks per ResNet stage for a deeper tiny ResNet, e.g. 3,4,6,3 (RN50's depth at tiny-rn's width)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = args.model
    if args.layers:
        _, cfg = resolve_config(args.model)
        cfg["vision_cfg"]["layers"] = [int(n) for n in args.layers.split(",")]
    model = HookedCLIP.from_config(cfg)
    images = torch.randn(args.images, 3, model.image_size, model.image_size)
    points = model.analysis_points()
    _, cache = model.run_with_cache(image=images[:1], names_filter=points)
    total_naive = total_ours = 0.0
    print(f"{'pair':<55} {'nodes':>5} {'naive s':>8} {'ours s':>8} {'ratio':>6} {'max rel diff':>12}")
    for u, d in zip(points[:-1], points[1:]):
        n_down = cache[d].shape[1]
        nodes = list(range(math.ceil(0.1 * n_down)))
        t0 = time.perf_counter()
        ours = ig_edge_scores(model, images, u, d, nodes, steps=args.steps)
        t1 = time.perf_counter()
        naive = reference_ig_edge_scores(model, images, u, d, nodes, steps=args.steps)
        t2 = time.perf_counter()
        diff = float((ours - naive).abs().max() / naive.abs().max().clamp_min(1e-30))
        total_ours += t1 - t0
        total_naive += t2 - t1
        print(f"{u + ' -> ' + d:<55} {len(nodes):>5} {t2 - t1:>8.3f} {t1 - t0:>8.3f} {(t2 - t1) / (t1 - t0):>6.1f} {diff:>12.2e}")
    print(f"total: naive {total_naive:.2f} s, ours {total_ours:.2f} s, ratio naive/ours = {total_naive / total_ours:.1f}x "
          f"({args.model}{' layers ' + args.layers if args.layers else ''}, {len(points)} points, {args.images} images, "
          f"{args.steps} steps, {args.threads} threads)")


if __name__ == "__main__":
    main()
