"""Many small (domain, class) cells at once against one call per cell, side by side in one run.

The study's circuit sets, causal test and faithfulness curves work on cells of one or two drawings
(48 cells per model: 6 domains x 8 circuit classes). One call per cell is mostly per-call overhead
(hooks, small kernels), so `discover_circuits` runs the node IG of every cell in one forward +
backward and `ablated_embeddings` stacks the ablation settings of a faithfulness curve into one
forward. This script times both against the plain loop they replace (the fastest honest
alternative: the same per-cell functions the code used before), checks that they agree, and
prints the ratios with all cores (wall) and with one thread (process CPU).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/batched_cells.py [--model tiny-rn]
        [--cells 48] [--images 1] [--size 32]

Measured 2026-12-04 (idle 2-core CPU, OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset; tiny-rn at 32 px,
48 one-image cells, 10 steps): see docs/quickstart.md#time for the numbers this prints.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from clipmech.analysis.ablation import (FAITHFULNESS_SIZES, ablated_embedding, ablated_embeddings, ablation_values,
                                        top_fraction_masks)
from clipmech.analysis.circuit import discover_circuit, discover_circuits
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config


def _timed(fn: Callable[[], object], threads: int) -> tuple[float, float, object]:
    """(wall s, process CPU s, result) of fn() on `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - t, time.process_time() - c, out
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--cells", type=int, default=48)
    ap.add_argument("--images", type=int, default=1, help="images per cell")
    ap.add_argument("--size", type=int, default=32, help="image size in px")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    _, cfg = resolve_config(args.model)
    model = HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=args.size))).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.cells * args.images, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        dim = model.encode_image(images[:1]).shape[-1]
    head = F.normalize(torch.randn(args.cells, dim, generator=gen), dim=-1)
    batches = [(images[i * args.images:(i + 1) * args.images], torch.full((args.images,), i)) for i in range(args.cells)]
    cores = torch.get_num_threads()
    print(f"{args.model} @ {args.size} px, {args.cells} cells x {args.images} image(s), {args.steps} IG steps; "
          f"wall with {cores} threads, CPU with 1 thread")
    print(f"{'what':34s} {'loop wall':>9s} {'ours wall':>9s} {'ratio':>6s} | {'loop CPU':>8s} {'ours CPU':>8s} {'ratio':>6s}")

    def row(name: str, loop: Callable[[], object], ours: Callable[[], object], same: Callable[[object, object], bool]):
        lw, _, a = _timed(loop, cores)
        ow, _, b = _timed(ours, cores)
        _, lc, _ = _timed(loop, 1)
        _, oc, _ = _timed(ours, 1)
        print(f"{name:34s} {lw:9.2f} {ow:9.2f} {lw / ow:5.2f}x | {lc:8.2f} {oc:8.2f} {lc / oc:5.2f}x"
              f"{'' if same(a, b) else '  (results differ!)'}")

    def same_nodes(a, b) -> bool:
        return all(x.nodes == y.nodes for x, y in zip(a, b))

    for edges in (False, True):
        row(f"circuits, edges={edges}",
            lambda e=edges: [discover_circuit(model, x, y, head, steps=args.steps, edges=e) for x, y in batches],
            lambda e=edges: discover_circuits(model, batches, head, steps=args.steps, edges=e), same_nodes)

    circuits = discover_circuits(model, batches, head, steps=args.steps, edges=False)
    points = [p for p in circuits[0].points if not p.endswith("hook_input")]
    fill = ablation_values(model, images, points, "mean")
    settings = [[top_fraction_masks(c, x, points) for x in FAITHFULNESS_SIZES] for c in circuits]

    def loop_curves():
        return [torch.stack([ablated_embedding(model, x, s, fill=fill) for s in per])
                for (x, _), per in zip(batches, settings)]

    def batched_curves():
        return [ablated_embeddings(model, x, {p: torch.stack([s[p] for s in per]) for p in points}, fill)
                for (x, _), per in zip(batches, settings)]

    row(f"faithfulness curves ({len(FAITHFULNESS_SIZES)} sizes)", loop_curves, batched_curves,
        lambda a, b: all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b)))


if __name__ == "__main__":
    main()
