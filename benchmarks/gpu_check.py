"""Every GPU figure of clipmech in one run: items in priority order, each capped in time, each result
appended to the output file (JSON lines) the moment it is measured, so a cut-short run still reports.

Items (priority order):
  train-step   RN50 @ 224 px, bf16 autocast, synthetic in-memory batch: forward + CLIP loss + backward
               + AdamW step, images/s and MFU (FLOPs of one step from torch.utils.flop_counter over
               the device's dense bf16 peak), torch.compile and channels_last on/off.
  trainers     `clipmech train` (emoji mixture held in memory) vs `python -m open_clip_train.main`
               (--dataset-type synthetic), same model, batch and precision, images/s of each and the
               ratio; open_clip_train also with --torchcompile. clipmech train has no compile /
               channels_last switch: train-step shows what they give.
  zeroshot     zero-shot evaluation of one (random-init) checkpoint over the emoji test split, images/s.
  circuit      the paper's circuit for one (domain, class) RN50 cell, 50 images, 10 steps: node scores
               at all points, edge scores for a sample of downstream nodes per consecutive pair,
               extrapolated to the top-10% nodes; seconds per cell and hours for 2,070 cells.
  cka          activation extraction (21 mean-pooled points) + 21 x 21 MinibatchCKA grid between two
               models, seconds per 10k images.
Every item reports its peak GPU memory (torch.cuda.max_memory_allocated).

    python benchmarks/gpu_check.py [--out gpu_check.jsonl] [--items ...] [--cap 120]
    python benchmarks/gpu_check.py --cpu-dry-run     # same code, tiny models, CPU, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# dense bf16 peak FLOP/s by device name fragment (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Budget:
    """Wall-clock cap of one item: `left()` seconds remain; loops stop when it reaches 0, after at
    least one measurement (a cap of 0 gives the quickest estimate, never none)."""

    def __init__(self, cap: float):
        self.end = time.perf_counter() + cap

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def model_cfg(name: str, image_size: int | None) -> dict:
    from clipmech.models.configs import resolve_config
    _, cfg = resolve_config(name)
    if image_size:
        cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": image_size}}
    return cfg


# ------------------------------------------------------------------------------------------ items
def item_train_step(s, emit: Callable[[dict], None]) -> None:
    """Raw training-step throughput and MFU for each (compile, channels_last) setting."""
    import open_clip
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode
    dev, cfg = s.device, model_cfg(s.model, s.image_size)
    size = cfg["vision_cfg"]["image_size"]
    ctx = cfg["text_cfg"].get("context_length", 77)
    for compile_, channels_last in s.step_variants:
        reset_peak(dev)
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg).to(dev).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = ClipLoss()
        images = torch.randn(s.batch, 3, size, size, device=dev)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        text = torch.randint(1, cfg["text_cfg"].get("vocab_size", 49408), (s.batch, ctx), device=dev)
        fwd = torch.compile(model) if compile_ else model

        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.bf16):
                img, txt, scale = fwd(images, text)[:3]
                loss = loss_fn(img, txt, scale)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as fc:  # eager count: compile does not change the math
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.bf16):
                img, txt, scale = model(images, text)[:3]
                loss = loss_fn(img, txt, scale)
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = fc.get_total_flops()
        budget = Budget(s.cap / len(s.step_variants))
        for _ in range(s.warmup):
            step()
        sync(dev)
        times = []
        while len(times) < s.steps and (budget.left() > 0 or not times):  # at least one timed step
            t = time.perf_counter()
            step()
            sync(dev)
            times.append(time.perf_counter() - t)
        sec = float(np.median(times))
        peak = peak_flops(dev)
        emit({"item": "train-step", "compile": compile_, "channels_last": channels_last, "model": s.model,
              "image_size": size, "batch": s.batch, "bf16": s.bf16, "steps_timed": len(times),
              "images_per_s": s.batch / sec, "step_s": sec, "tflop_per_step": flops / 1e12,
              "mfu": flops / sec / peak if peak else None, "peak_gib": peak_gib(dev)})
        del model, opt, fwd


def _open_clip_rates(log_dir: Path) -> list[float]:
    text = "".join(p.read_text() for p in log_dir.rglob("out.log"))
    return [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s", text)]


def item_trainers(s, emit: Callable[[dict], None]) -> None:
    """clipmech train vs open_clip_train.main, in this process, same model / batch / precision."""
    import csv
    import open_clip
    from open_clip_train.main import main as open_clip_main
    from clipmech.train import train
    from clipmech.train.trainer import model_config
    from clipmech.train.config import load_config
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import subset_mixture
    precision = "amp_bf16" if s.bf16 else "fp32"
    n = s.batch * (s.trainer_steps + 2)
    mix = subset_mixture("emoji", "cg_high", n)
    _, mcfg = model_config(load_config({"model": {"name": s.model, "image_size": s.image_size}}))
    with tempfile.TemporaryDirectory(prefix="clipmech-gpu-") as tmp:
        work = Path(tmp)
        (work / "cfg").mkdir()
        (work / "cfg" / "gpu-check.json").write_text(json.dumps(mcfg))
        open_clip.add_model_config(str(work / "cfg"))
        reset_peak(s.device)
        t0 = time.perf_counter()
        out = work / "clipmech"
        train({"model": {"name": s.model, "image_size": s.image_size}, "optim": {"lr": 1e-4},
               "schedule": {"warmup": 1},
               "train": {"epochs": 1, "batch_size": s.batch, "device": s.device.type, "out": str(out),
                         "precision": precision, "save_every": 10 ** 6, "save_epochs": [], "progress": False,
                         "tensorboard": False}}, mixture=mix)
        with open(out / "log.csv") as fh:
            ours = [float(r["images_per_s"]) for r in csv.DictReader(fh)][2:]
        emit({"item": "trainers", "trainer": "clipmech train", "model": s.model, "batch": s.batch,
              "precision": precision, "images_per_s": float(np.median(ours)) if ours else None,
              "steps_timed": len(ours), "wall_s": time.perf_counter() - t0, "peak_gib": peak_gib(s.device)})
        for extra in s.open_clip_variants:
            reset_peak(s.device)
            t0 = time.perf_counter()
            logs = work / f"oc{len(extra)}"
            root = logging.getLogger()
            level, handlers = root.level, list(root.handlers)
            open_clip_main(["--dataset-type", "synthetic", "--train-data", "synthetic", "--train-num-samples", str(n),
                            "--model", "gpu-check", "--batch-size", str(s.batch), "--epochs", "1", "--lr", "1e-4",
                            "--warmup", "1", "--workers", str(s.workers), "--precision", precision,
                            "--device", s.device.type, "--logs", str(logs), "--name", "run", "--save-frequency", "0",
                            "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1",
                            "--report-to", "", "--seed", "0", *extra])
            root.setLevel(level)  # open_clip_train sets up INFO logging on the root logger; undo it
            root.handlers[:] = handlers
            theirs = _open_clip_rates(logs)[2:]
            emit({"item": "trainers", "trainer": "open_clip_train " + " ".join(extra), "model": s.model,
                  "batch": s.batch, "precision": precision,
                  "images_per_s": float(np.median(theirs)) if theirs else None, "steps_timed": len(theirs),
                  "wall_s": time.perf_counter() - t0, "peak_gib": peak_gib(s.device)})


def item_zeroshot(s, emit: Callable[[dict], None]) -> None:
    from clipmech.data import load_dataset
    from clipmech.eval.zeroshot import zero_shot
    from clipmech.models import HookedCLIP
    torch.manual_seed(0)
    model = HookedCLIP.from_config(model_cfg(s.model, s.image_size)).to(s.device).eval()
    ds = load_dataset("emoji")
    idx = ds.indices(split="test")[: s.zeroshot_images]
    reset_peak(s.device)
    t = time.perf_counter()
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16):
        zero_shot(model, ds, idx, templates=s.templates, batch_size=s.batch)
    sync(s.device)
    sec = time.perf_counter() - t
    emit({"item": "zeroshot", "model": s.model, "images": len(idx), "seconds": sec, "images_per_s": len(idx) / sec,
          "note": "includes the class head (K x T text forwards) and image decoding", "peak_gib": peak_gib(s.device)})


def item_circuit(s, emit: Callable[[dict], None]) -> None:
    from clipmech.analysis.circuits import ig_edge_scores, ig_node_scores
    from clipmech.models import HookedCLIP
    torch.manual_seed(0)
    model = HookedCLIP.from_config(model_cfg(s.model, s.image_size)).to(s.device).eval()
    points = model.analysis_points()
    images = torch.randn(s.circuit_images, 3, model.image_size, model.image_size, device=s.device)
    head = F.normalize(torch.randn(10, model_cfg(s.model, s.image_size)["embed_dim"], device=s.device), dim=-1)
    labels = torch.zeros(len(images), dtype=torch.long, device=s.device)
    reset_peak(s.device)
    budget = Budget(s.cap)
    t = time.perf_counter()
    nodes = {p: ig_node_scores(model, images, labels, head, p, steps=10) for p in points}
    sync(s.device)
    node_s = time.perf_counter() - t
    edge_s, done = 0.0, []
    for u, d in zip(points[:-1], points[1:]):
        if done and budget.left() <= 0:  # past the cap: extrapolate from the pairs measured so far
            break
        top = math.ceil(0.1 * len(nodes[d]))
        sample = torch.argsort(nodes[d], descending=True)[: min(s.edge_sample, top)].tolist()
        t = time.perf_counter()
        ig_edge_scores(model, images, u, d, sample, steps=10)
        sync(s.device)
        dt = time.perf_counter() - t
        edge_s += dt * top / len(sample)  # extrapolated to the top-10% downstream nodes
        done.append({"pair": f"{u}->{d}", "sampled": len(sample), "top10": top, "seconds": dt})
    pairs = len(points) - 1
    if len(done) < pairs:
        edge_s *= pairs / len(done)
    cell = node_s + edge_s
    emit({"item": "circuit", "model": s.model, "image_size": model.image_size, "images": len(images), "steps": 10,
          "node_seconds": node_s, "edge_seconds_extrapolated": edge_s, "pairs_measured": len(done), "pairs": pairs,
          "edge_sample_per_pair": s.edge_sample, "cell_seconds": cell, "hours_2070_cells": cell * 2070 / 3600,
          "pairs_detail": done, "peak_gib": peak_gib(s.device)})


def item_cka(s, emit: Callable[[dict], None]) -> None:
    from clipmech.analysis.activations import pool
    from clipmech.analysis.cka import MinibatchCKA
    from clipmech.models import HookedCLIP
    cfg = model_cfg(s.model, s.image_size)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(HookedCLIP.from_config(cfg).to(s.device).eval())
    points = [p for p in models[0].analysis_points() if p != "visual.hook_input"]
    size = models[0].image_size
    reset_peak(s.device)
    budget = Budget(s.cap)
    acc = MinibatchCKA("linear", "unbiased")
    extract = grid = 0.0
    n = 0
    g = torch.Generator(device=s.device).manual_seed(0)
    while n < s.cka_images and (budget.left() > 0 or n == 0):
        images = torch.randn(s.cka_batch, 3, size, size, device=s.device, generator=g)
        t = time.perf_counter()
        feats = []
        with torch.no_grad(), torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            for m in models:
                _, cache = m.run_with_cache(image=images, names_filter=points, stop_at=points[-1])
                feats.append([pool(cache[p], "mean").float().cpu() for p in points])
        sync(s.device)
        t2 = time.perf_counter()
        acc.update(feats[0], feats[1])
        grid += time.perf_counter() - t2
        extract += t2 - t
        n += len(images)
    acc.compute()
    emit({"item": "cka", "model": s.model, "images": n, "points": len(points), "batch": s.cka_batch,
          "extract_s_per_10k": extract / n * 1e4, "grid_s_per_10k": grid / n * 1e4,
          "note": "two models' activations (both sides of the grid); grid on CPU (float64)",
          "peak_gib": peak_gib(s.device)})


ITEMS = {"train-step": item_train_step, "trainers": item_trainers, "zeroshot": item_zeroshot,
         "circuit": item_circuit, "cka": item_cka}


def settings(a: argparse.Namespace) -> argparse.Namespace:
    """What each item runs: RN50 at 224 px bf16 on the GPU; tiny-rn at 32-64 px fp32 for the dry run."""
    if a.cpu_dry_run:
        return argparse.Namespace(
            device=torch.device("cpu"), model="tiny-rn", image_size=32, batch=8, bf16=False, steps=2, warmup=1,
            step_variants=[(False, False), (False, True)],  # CPU torch.compile takes minutes: not in the dry run
            trainer_steps=2, open_clip_variants=[[]], workers=0, zeroshot_images=32, templates=["a photo of a {}."],
            circuit_images=2,
            edge_sample=2, cka_images=32, cka_batch=16, cap=a.cap)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
    return argparse.Namespace(
        device=torch.device("cuda"), model="RN50", image_size=224, batch=a.batch, bf16=True, steps=20, warmup=5,
        step_variants=[(False, False), (False, True), (True, False), (True, True)], trainer_steps=30,
        open_clip_variants=[[], ["--torchcompile"]], workers=8, zeroshot_images=5000, templates=None, circuit_images=50,
        edge_sample=8, cka_images=10_000, cka_batch=256, cap=a.cap)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.jsonl", help="JSON lines, appended as each result is measured")
    p.add_argument("--items", nargs="+", default=list(ITEMS), choices=list(ITEMS), help="run in this order")
    p.add_argument("--cap", type=float, default=120.0, help="seconds per item (loops stop at the cap)")
    p.add_argument("--batch", type=int, default=256, help="training batch (GPU)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny models on CPU, same code, < 1 minute")
    a = p.parse_args(argv)
    s = settings(a)
    out = Path(a.out)
    head = {"item": "run", "utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "host": platform.node(),
            "device": torch.cuda.get_device_name() if s.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dry_run": a.cpu_dry_run, "items": a.items}

    def emit(rec: dict) -> None:
        with open(out, "a") as fh:  # one line per result, flushed now: a cut-short run keeps what it measured
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    emit(head)
    failed = 0
    for name in a.items:
        t, cpu = time.perf_counter(), time.process_time()
        try:
            ITEMS[name](s, emit)
        except Exception as err:  # one broken item must not cost the others their GPU minutes
            failed += 1
            emit({"item": name, "error": f"{type(err).__name__}: {err}"})
        print(f"[{name}] {time.perf_counter() - t:.1f}s wall, {time.process_time() - cpu:.1f}s CPU", file=sys.stderr,
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
