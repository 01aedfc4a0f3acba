"""Peak memory of the paper-scale analysis of one run at N and 4N images (issue 15's target: growth
of the peak RSS above the post-import baseline <= 25 %).

A DomainNet-layout fixture (clipmech.data.synthetic.write_fake_domainnet) holds N test images (and a
fixed 2 train images per (domain, class) for the SAE, whose training streams shards either way); a
tiny-rn run is created at IMAGE_SIZE px in this process (0 training epochs: memory does not depend on
the weights' values). Each size is analysed in a fresh subprocess: import and load, record the
RSS (the baseline), then run every analysis unit of the run in that process (extraction to shards,
circuits, streamed CKA, SAE + sharing, embeddings) and report the peak RSS (ru_maxrss) above the
baseline. N is chosen so that the preprocessed N images alone (N x 3 x S x S float32, what the old
path stacked in memory) are at least the baseline: holding them would at least double the footprint.

    python benchmarks/analyse_memory.py [--n 1600] [--image-size 224]

(--n 1536 gave 882 MB of images against an 897 MB baseline; 1600 clears it.)

Timings are not the point here; the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ("apple", "axe", "banana", "bear", "cat", "dog", "tree", "zebra")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_run(root: Path, image_size: int) -> Path:
    """A tiny-rn run at `image_size` px on the fixture (0 epochs: memory does not depend on the weights)."""
    from clipmech.train.trainer import train
    run_dir = root / "run"
    train({"model": {"name": "tiny-rn", "image_size": image_size}, "data": {"dataset": str(root / "dn")},
           "mixture": {"setup": "cg_high", "test_domain": "clipart", "test_classes": list(CLASSES[:4])},
           "train": {"epochs": 0, "batch_size": 8, "out": str(run_dir), "tensorboard": False, "progress": False}})
    return run_dir


def child(root: str) -> None:
    """Load the run, take the baseline, run every analysis unit here; print one JSON line."""
    from clipmech.launch import LaunchOptions, run_units
    from clipmech.study.analyse import AnalysisOptions, RunContext, plan_units

    root_p = Path(root)
    run_dir = root_p / "run"
    opts = AnalysisOptions(circuit_classes=1, circuit_images=16, circuit_steps=2, sae_steps=20, cka_boot=20,
                           embedding_images=200, batch_size=64, shard_rows=1024, device="cpu",
                           controls=False)  # the controls hold the splits in memory: not what this measures
    ctx = RunContext(run_dir, opts)
    ctx.source.dataset.content_hash(), ctx.source.model, ctx.checkpoint_hash  # noqa: B018  (loaded before the baseline)
    units = plan_units(ctx, root_p / "analysis", "run", with_umap=False, test_domains=["sketch"])
    baseline = _rss_mb()
    t0 = time.perf_counter()
    run_units(list(units.values()), LaunchOptions(), stage="bench", stream=open(os.devnull, "w"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_test, image_size = len(ctx.rows("test")), ctx.source.image_size
    print(json.dumps({"n_test": n_test, "n_train": len(ctx.rows("train")), "baseline_mb": baseline,
                      "peak_mb": peak, "above_mb": peak - baseline, "seconds": seconds,
                      "images_in_memory_mb": n_test * 3 * image_size ** 2 * 4 / 2**20,
                      "unit_seconds": {n: json.loads((Path(u.folder) / "done").read_text())["seconds"]
                                       for n, u in units.items()}}))


def measure(n_images: int, image_size: int) -> dict:
    """Write the fixture with ~n_images test images (and as many train) and run `child` on it."""
    from clipmech.data.domainnet import DOMAINS
    from clipmech.data.synthetic import write_fake_domainnet
    per_cell = max(1, round(n_images / (len(DOMAINS) * len(CLASSES))))
    with tempfile.TemporaryDirectory() as tmp:
        counts = {(d, c, s): per_cell if s == "test" else 2 for d in DOMAINS for c in CLASSES for s in ("train", "test")}
        write_fake_domainnet(Path(tmp) / "dn", counts, size=16)
        make_run(Path(tmp), image_size)
        out = subprocess.run([sys.executable, __file__, "--child", tmp],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1600, help="test images at the small size (4N at the large)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    small, large = measure(args.n, args.image_size), measure(4 * args.n, args.image_size)
    for name, r in (("N", small), ("4N", large)):
        print(f"{name:>2}: {r['n_test']} test + {r['n_train']} train images at {args.image_size} px | baseline "
              f"{r['baseline_mb']:.0f} MB | peak above baseline {r['above_mb']:.0f} MB | the test images held "
              f"in memory would be {r['images_in_memory_mb']:.0f} MB | {r['seconds']:.0f} s")
        print("    unit seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["unit_seconds"].items()))
    growth = large["above_mb"] / small["above_mb"] - 1
    print(f"peak-RSS growth above baseline from N to 4N: {100 * growth:+.1f} % (target <= 25 %)")


if __name__ == "__main__":
    main()
