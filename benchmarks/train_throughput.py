"""Training throughput: clipmech's trainer vs `open_clip_train.main` on the same tiny model and data.

Both train the same open_clip config (default: tiny-rn at 32 px) for one epoch on the same subset of
an emoji mixture, alternating in `--rounds` rounds so machine load hits both alike. open_clip_train
reads the mixture exported as TSV (`--dataset-type csv`, PNG files, DataLoader workers); clipmech
reads the in-memory images, as each is normally used. Throughput = images per second of each
optimizer step (clipmech: log.csv; open_clip_train: its "N/s" log field), first `--skip` steps of
each run dropped, median over all rounds.

    python benchmarks/train_throughput.py [--model tiny-rn --image-size 32 --batch-size 64 --steps 12]

Needs open_clip_train's optional deps (braceexpand, webdataset, pandas).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OPEN_CLIP_WRAPPER = """
import sys
import open_clip
open_clip.add_model_config(sys.argv[1])  # a folder with our tiny config as <name>.json
from open_clip_train.main import main
main(sys.argv[2:])
"""

CLIPMECH_WRAPPER = """
import json, sys
import numpy as np
from types import SimpleNamespace
from clipmech.data import load_dataset
from clipmech.train import train
spec = json.load(open(sys.argv[1]))
ds = load_dataset(spec["dataset"])
mix = SimpleNamespace(dataset=ds, indices=np.asarray(spec["indices"]), captions=spec["captions"])
train(spec["config"], mixture=mix)
"""


def subset_mixture(dataset: str, setup: str, n: int, seed: int = 0):
    """The first-`n`-of-a-permutation subset of a mixture (a Mixture with fewer indices)."""
    from clipmech.data import load_dataset
    from clipmech.data.mixtures import build_mixture
    mix = build_mixture(load_dataset(dataset), setup)
    if n > len(mix.indices):
        raise ValueError(f"--batch-size x --steps = {n} exceeds the mixture's {len(mix.indices)} samples")
    pick = np.sort(np.random.default_rng(seed).permutation(len(mix.indices))[:n])
    return dataclasses.replace(mix, indices=mix.indices[pick], captions=[mix.captions[i] for i in pick],
                               base_lines=[])


def run_open_clip(work: Path, tsv: Path, model_dir: Path, model: str, args, tag: str) -> list[float]:
    wrapper = work / "open_clip_wrapper.py"
    wrapper.write_text(OPEN_CLIP_WRAPPER)
    cmd = [sys.executable, str(wrapper), str(model_dir),
           "--train-data", str(tsv), "--dataset-type", "csv", "--csv-separator", "\t",
           "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", model,
           "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "1e-3", "--warmup", "5",
           "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu", "--seed", "0",
           "--logs", str(work / "oc_logs"), "--name", tag, "--save-frequency", "0", "--zeroshot-frequency", "0",
           "--val-frequency", "0", "--log-every-n-steps", "1", "--report-to", ""]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{res.stderr[-3000:]}")
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s", res.stdout + res.stderr)]
    return rates[args.skip:]


def run_clipmech(work: Path, mix, args, tag: str) -> list[float]:
    out = work / f"cm_{tag}"
    config = {"model": {"name": args.model, "image_size": args.image_size},
              "optim": {"lr": 1e-3}, "schedule": {"warmup": 5},
              "train": {"epochs": 1, "batch_size": args.batch_size, "device": "cpu", "out": str(out),
                        "save_every": 10_000, "progress": False, "tensorboard": False},
              "data": {"workers": 0}}
    spec = work / f"cm_{tag}.json"
    spec.write_text(json.dumps({"dataset": args.dataset, "indices": mix.indices.tolist(),
                                "captions": mix.captions, "config": config}))
    wrapper = work / "clipmech_wrapper.py"
    wrapper.write_text(CLIPMECH_WRAPPER)
    res = subprocess.run([sys.executable, str(wrapper), str(spec)], capture_output=True, text=True,
                         timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"clipmech train failed:\n{res.stderr[-3000:]}")
    with open(out / "log.csv") as fh:
        return [float(r["images_per_s"]) for r in csv.DictReader(fh)][args.skip:]


def measure(argv: list[str] | None = None) -> dict:
    """Run both trainers (arguments as on the command line); median images/s of each and the setting."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-rn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dataset", default="emoji")
    p.add_argument("--setup", default="cg_high")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (one epoch)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps dropped from each run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="open_clip_train DataLoader workers")
    p.add_argument("--timeout", type=int, default=1200)
    args = p.parse_args(argv)

    from clipmech.models.configs import model_config
    from clipmech.train.config import load_config

    _, mcfg = model_config(load_config({"model": {"name": args.model, "image_size": args.image_size}}))
    mix = subset_mixture(args.dataset, args.setup, args.batch_size * args.steps)
    with tempfile.TemporaryDirectory(prefix="clipmech-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "model_configs"
        model_dir.mkdir()
        bench_name = "clipmech-bench"
        (model_dir / f"{bench_name}.json").write_text(json.dumps(mcfg))
        tsv = mix.to_tsv(work / "train.tsv", image_dir=work / "images", manifest=False)
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        ours, theirs = [], []
        for r in range(args.rounds):
            theirs += run_open_clip(work, tsv, model_dir, bench_name, args, f"r{r}")
            ours += run_clipmech(work, mix, args, f"r{r}")
            print(f"round {r + 1}/{args.rounds}: clipmech median {statistics.median(ours):.1f} img/s, "
                  f"open_clip_train median {statistics.median(theirs):.1f} img/s", flush=True)
    setting = (f"model {args.model} @ {args.image_size}px, batch {args.batch_size}, {args.steps} steps x "
               f"{args.rounds} rounds, CPU threads {os.environ['OMP_NUM_THREADS']}")
    return {"clipmech": statistics.median(ours), "open_clip_train": statistics.median(theirs), "setting": setting,
            "steps": (len(ours), len(theirs))}


def main(argv: list[str] | None = None) -> int:
    r = measure(argv)
    a, b = r["clipmech"], r["open_clip_train"]
    print(r["setting"])
    print(f"clipmech        median {a:8.1f} images/s  ({r['steps'][0]} steps)")
    print(f"open_clip_train median {b:8.1f} images/s  ({r['steps'][1]} steps)")
    print(f"ratio clipmech / open_clip_train = {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
