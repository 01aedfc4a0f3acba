"""HookedCLIP overhead vs open_clip: median time ratio of a full CLIP forward (images + texts).

For each model, one open_clip CLIP and a HookedCLIP sharing its weights run the same batch,
interleaved round by round so machine load affects all variants alike:
  (a) HookedCLIP forward, no hooks               target <= 1.05
  (b) run_with_cache of all analysis points      target <= 1.3
  (c) run_with_cache of every hook point        target <= 1.3 (points without other hooks are cached
      by a storing identity forward, not a TransformerLens hook; on a shared CPU, 1 thread, 2026-11-29:
      tiny-vit 1.56 -> 1.10, ViT-B-32 1.15 -> 1.00)
Printed ratios are medians over rounds of (variant time / open_clip time in the same round).

    python benchmarks/hooks.py [--models tiny-rn tiny-vit RN50 ViT-B-32] [--batch 8] [--rounds N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from clipmech import HookedCLIP
from clipmech.models import create_open_clip


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, batch: int, rounds: int) -> dict[str, float]:
    """Median per-round ratios {a, b, c} and open_clip's median seconds for one model."""
    torch.manual_seed(0)
    clip = create_open_clip(name)
    model = HookedCLIP.from_open_clip(clip, model_name=name)
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    text = model.tokenize([f"a photo of object number {i}" for i in range(batch)])
    points = model.analysis_points()
    variants = {
        "open_clip": lambda: clip(images, text),
        "a": lambda: model(image=images, text=text),
        "b": lambda: model.run_with_cache(image=images, text=text, names_filter=points),
        "c": lambda: model.run_with_cache(image=images, text=text),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for r in range(rounds + 2):  # two warm-up rounds
            for key, fn in variants.items():
                t = _seconds(fn)
                if r >= 2:
                    times[key].append(t)
    base = times["open_clip"]
    out = {k: statistics.median(t / b for t, b in zip(times[k], base)) for k in ("a", "b", "c")}
    out["open_clip_s"] = statistics.median(base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-rn", "tiny-vit", "RN50", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="default: 30 for tiny models, 7 otherwise")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, CPU, {torch.get_num_threads()} threads; ratio = HookedCLIP / open_clip forward "
          "(images + texts), median over interleaved rounds")
    print(f"{'model':<10} {'open_clip s':>11} {'(a) no hooks':>13} {'(b) analysis pts':>17} {'(c) all hooks':>14}")
    for name in args.models:
        rounds = args.rounds or (30 if name.startswith("tiny") else 7)
        r = bench(name, args.batch, rounds)
        print(f"{name:<10} {r['open_clip_s']:>11.4f} {r['a']:>13.3f} {r['b']:>17.3f} {r['c']:>14.3f}", flush=True)
    print("targets: (a) <= 1.05, (b) <= 1.3, (c) <= 1.3")


if __name__ == "__main__":
    main()
