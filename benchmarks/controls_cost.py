"""What the per-run analysis plan costs per model, circuits and their controls, from a measured CPU
run and FLOP counts.

One (domain, class) circuit = node IG at every point + edge IG per consecutive pair. This script
(1) counts the FLOPs of one image-tower forward (torch.utils.flop_counter) of the measured model and
of the target model (default RN50 at 224 px), (2) times one circuit of the measured model on CPU
(process CPU seconds, `--threads`), and expresses it in "forward equivalents" (circuit FLOPs actually
spent / one forward's FLOPs, i.e. CPU seconds x the same machine's measured forward FLOP rate), which
carry across model sizes because both node and edge IG are forwards and backwards over the same
layers. (3) The circuit work per model: the score set (cells = domains x circuit classes), and the
controls' two more sets of the same cells (the training-drawing ceiling circuits and the untrained
model's floor circuits) -- the controls triple the circuit work; faithfulness (len(sizes) + 1
forwards per cell, twice) and the causal test (two ablated forwards per class) add forwards only.
(4) GPU hours = FLOPs / `--gpu-tflops` (sustained fp32 rate assumed for the IG passes).

    python benchmarks/controls_cost.py [--model RN50 --size 64 --images 2] [--steps 10] [--gpu-tflops 8]

Timings on a shared machine are CPU seconds of this process, not wall time. Measured 2026-12-03 (one
thread, 2-core machine under load ~10): RN50 @ 64 px, 2 images: forward 0.97 GFLOP, 23.5 ms; one circuit
16.4 s = 349 forward equivalents per image; RN50 @ 224 px 11.6 GFLOP per forward, so one 50-image cell
= 202 TFLOP. (tiny-rn @ 32 px gives 103 equivalents: 10 points instead of 22, overhead-bound forwards.)
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipmech.analysis.circuits import discover_circuit
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config


def tower(name: str, image_size: int) -> HookedCLIP:
    _, cfg = resolve_config(name)
    return HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=image_size))).eval()


def forward_flops(model: HookedCLIP, image_size: int) -> float:
    """FLOPs of one image through the image tower (counted, not timed)."""
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(x)
    return float(counter.get_total_flops())


def cpu_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="RN50", help="measured model (RN50: the target's depth and widths)")
    ap.add_argument("--size", type=int, default=64, help="measured image size (small, so a CPU finishes)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="RN50")
    ap.add_argument("--target-size", type=int, default=224)
    ap.add_argument("--target-images", type=int, default=50, help="images per circuit cell (paper: 50)")
    ap.add_argument("--domains", type=int, default=6)
    ap.add_argument("--classes", type=int, nargs="+", default=[15, 345], help="circuit classes (C2; all)")
    ap.add_argument("--gpu-tflops", type=float, default=8.0, help="assumed sustained fp32 TFLOP/s of the IG passes")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(0)
        model = tower(args.model, args.size)
        f_small = forward_flops(model, args.size)
        x = torch.randn(args.images, 3, args.size, args.size)
        labels = torch.zeros(args.images, dtype=torch.long)
        head = torch.nn.functional.normalize(torch.randn(8, model.encode_image(x[:1]).shape[-1]), dim=-1)
        with torch.no_grad():
            t_fwd = cpu_seconds(lambda: model.encode_image(x)) / args.images
        t_circuit = cpu_seconds(lambda: discover_circuit(model, x, labels, head, steps=args.steps), repeats=1)
        equivalents = t_circuit / (t_fwd * args.images)  # forward passes per image one circuit costs
        f_target = forward_flops(tower(args.target, args.target_size), args.target_size)
    finally:
        torch.set_num_threads(threads)
    per_cell = equivalents * args.target_images * f_target
    print(f"{args.model} @ {args.size}px: forward {f_small / 1e6:.1f} MFLOP, {t_fwd * 1e3:.2f} ms CPU per image; "
          f"one circuit ({args.images} images, {args.steps} steps) {t_circuit:.2f} s CPU = {equivalents:.0f} "
          "forward equivalents per image")
    print(f"{args.target} @ {args.target_size}px: forward {f_target / 1e9:.2f} GFLOP; one circuit cell of "
          f"{args.target_images} images = {per_cell / 1e12:.1f} TFLOP")
    print("| circuit classes | cells | score circuits | + controls (x3) | GPU h at "
          f"{args.gpu_tflops:g} TFLOP/s |")
    print("|---|---|---|---|---|")
    for k in args.classes:
        cells = args.domains * k
        score = cells * per_cell
        print(f"| {k} | {cells} | {score / 1e15:.0f} PFLOP | {3 * score / 1e15:.0f} PFLOP | "
              f"{score / (args.gpu_tflops * 1e12) / 3600:.1f} -> {3 * score / (args.gpu_tflops * 1e12) / 3600:.1f} |")


if __name__ == "__main__":
    main()
