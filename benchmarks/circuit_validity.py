"""Are the circuits right? Discovery methods side by side on planted circuits with known answers
(tiny-rn and tiny-vit, every motif, every method: AUROC and precision at the true size against the
planted set, wall time) and, given a quickstart output directory, edge-level CPR / CMD of every
method on the trained quickstart models under zero, mean, resample and counterfactual ablation.
Writes one JSON file (rows with the scores, the truth, node scores and top edges per method and
cell) and prints the tables. Definitions and the predicted outcome per motif: docs/circuit_validity.md.

The planted models start from a tiny-rn / tiny-vit trained in-process for `--train-steps` steps
(supervised, cross-entropy on the zero-shot-style linear readout of the embedded emoji data; 0 =
random initialisation, what `--quick` uses) and plant on `--images` test images of one class.

    python benchmarks/circuit_validity.py [--quick] [--out circuit_validity.json] [--quickstart DIR]
        [--train-steps 150] [--images 8] [--steps 10] [--mask-steps 200] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from clipmech.analysis.discovery import METHODS
from clipmech.analysis.planted import MOTIFS, evaluate_planted
from clipmech.data.emoji import load_emoji
from clipmech.eval.zeroshot import eval_images
from clipmech.models import HookedCLIP


def trained_tiny(name: str, steps: int, seed: int = 0) -> tuple[HookedCLIP, torch.Tensor]:
    """A tiny image tower trained `steps` Adam steps (batch 32) to classify the emoji train split
    through a linear map of its embedding; returns the model (eval) and the test images of class 0."""
    torch.manual_seed(seed)
    model = HookedCLIP.from_config(name)
    ds = load_emoji(views=1)
    train = ds.indices(split="train")
    test = ds.indices(split="test")
    size = model.image_size
    if steps:
        x = eval_images(ds, train, size)
        y = torch.as_tensor(ds.class_idx[train])
        probe = torch.nn.Linear(model.visual.output_dim, len(ds.classes))
        opt = torch.optim.Adam(list(model.visual.parameters()) + list(probe.parameters()), lr=1e-3)
        model.train()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = torch.randint(len(x), (32,), generator=gen)
            loss = torch.nn.functional.cross_entropy(probe(model.encode_image(x[pick])), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    cls0 = test[ds.class_idx[test] == 0]
    return model, eval_images(ds, cls0, size)


def planted_rows(args) -> list[dict]:
    rows = []
    for name in ("tiny-rn", "tiny-vit"):
        start = time.perf_counter()
        model, images = trained_tiny(name, args.train_steps)
        trained_s = time.perf_counter() - start
        images = images[:args.images]
        for row in evaluate_planted(model, images, steps=args.steps, mask_steps=args.mask_steps):
            rows.append({"model": name, "train_steps": args.train_steps, "train_seconds": trained_s,
                         "n_images": len(images), **row})
    return rows


def print_planted(rows: list[dict]) -> None:
    print("\nPlanted circuits (zero ablation): node AUROC / precision@true | edge AUROC / precision@true | seconds")
    fmt = lambda v: "  -  " if v is None else f"{v:.2f}"  # noqa: E731
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{model}")
        print(f"{'motif':13s}" + "".join(f"{m:>26s}" for m in METHODS))
        for motif in MOTIFS:
            cells = {r["method"]: r for r in rows if r["model"] == model and r["motif"] == motif}
            line = f"{motif:13s}"
            for m in METHODS:
                r = cells[m]
                line += f"  {fmt(r['node_auroc'])}/{fmt(r['node_precision'])} {fmt(r['edge_auroc'])}/{fmt(r['edge_precision'])} {r['seconds']:5.1f}"
            print(line)
    print("\nmean over motifs and models (node precision, edge precision):")
    for m in METHODS:
        sel = [r for r in rows if r["method"] == m]
        edge = [r["edge_precision"] for r in sel if r["edge_precision"] is not None]
        print(f"  {m:9s} {np.mean([r['node_precision'] for r in sel]):.2f} {np.mean(edge) if edge else float('nan'):.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: untrained models, 2 images, 4 IG steps, 20 mask steps")
    ap.add_argument("--out", default="circuit_validity.json")
    ap.add_argument("--quickstart", default=None, help="a quickstart output directory: CPR / CMD on its models")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mask-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_steps, args.images, args.steps, args.mask_steps = 0, 2, 4, 20
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        out = {"args": vars(args), "planted": planted_rows(args)}
        print_planted(out["planted"])
        out["seconds"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    Path(args.out).write_text(json.dumps(out))
    print(f"\nwrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
