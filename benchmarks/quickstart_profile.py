"""Seconds per quickstart stage, per stage kind and per model: wall and process CPU time.

    python benchmarks/quickstart_profile.py --out /tmp/qs [--seeds N] [--second-run]

Runs `clipmech quickstart` in-process (fresh folder unless it exists: then stages are reused) and
prints, from results.json's extra.stages: each stage's wall and CPU seconds, totals per stage kind
(train, evaluate, CKA, circuits, SAE, embeddings, ...) with their share of the total, and totals per
trained model. CPU seconds (all threads of this process) change little when other processes share
the machine; wall seconds do, so report both. With --second-run it runs again in the same folder and
prints how many stages were reused (all of them, when nothing changed). With --data it instead
times the training input pipeline side by side in one process: CPU seconds of a first pass over a
quickstart mixture (captions tokenized) against a second pass (tokens cached), per item. With
--workers it trains the same few models (--epochs, default 4) twice into fresh folders, side by side
in one run: one process with all threads, then `train_workers` = 2 processes of one thread each, and
prints both wall times and the ratio.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from dataclasses import replace

from clipmech.study.quickstart import QuickstartOptions, run_quickstart


def _kind(stage: str) -> str:
    return stage.split(" ")[0] if stage.split(" ")[0] in {"train", "evaluate", "CKA", "circuits", "SAE",
                                                          "embeddings"} else stage


def _model(stage: str) -> str | None:
    m = re.match(r"^\S+ (\S+)", stage)
    return m.group(1) if m and _kind(stage) != stage else None


def summarize(stages: dict[str, dict], wall_total: float, cpu_total: float) -> str:
    """Table text: per stage kind and per model, wall and CPU seconds with their shares."""
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    models: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, t in stages.items():
        k = kinds[_kind(name)]
        k[0] += t["wall_s"]; k[1] += t["cpu_s"]; k[2] += 1
        if _model(name):
            models[_model(name)][0] += t["wall_s"]; models[_model(name)][1] += t["cpu_s"]
    lines = [f"total: wall {wall_total:.1f}s, CPU {cpu_total:.1f}s", "",
             f"{'stage kind':<20}{'n':>4}{'wall s':>9}{'wall %':>8}{'CPU s':>9}{'CPU %':>8}"]
    for k, (w, c, n) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{k:<20}{n:>4}{w:>9.1f}{100 * w / wall_total:>8.1f}{c:>9.1f}{100 * c / cpu_total:>8.1f}")
    lines += ["", f"{'model':<28}{'wall s':>9}{'CPU s':>9}"]
    lines += [f"{m:<28}{w:>9.1f}{c:>9.1f}" for m, (w, c) in models.items()]
    return "\n".join(lines)


def data_pipeline(opts: QuickstartOptions) -> str:
    """CPU seconds per item of clipmech.train.data.MixtureView: first pass vs cached-token passes."""
    from clipmech.data.mixtures import build_mixture
    from clipmech.study.quickstart import resolve_dataset
    from clipmech.train.data import MixtureView

    ds, domains, c2 = resolve_dataset(opts)
    mix = build_mixture(ds, "cg_high", test_domain=domains[0], test_classes=c2, split="train", seed=42)
    view = MixtureView(mix, opts.image_size, 77)
    times = []
    for epoch in range(3):
        c0 = time.process_time()
        for pos in range(len(view)):
            view[(pos, epoch * len(view) + pos)]
        times.append((time.process_time() - c0) / len(view))
    return (f"MixtureView, {len(view)} items: first pass {1e3 * times[0]:.3f} ms/item CPU (tokenizes), "
            f"later passes {1e3 * min(times[1:]):.3f} ms/item (cached tokens): {times[0] / min(times[1:]):.2f}x")


def train_workers(opts: QuickstartOptions, epochs: int, n_models: int = 4) -> str:
    """Wall seconds to train `n_models` quickstart models with 1 worker vs 2 workers (fresh folders)."""
    import tempfile
    from pathlib import Path

    from clipmech.study.quickstart import Study, model_specs, resolve_dataset, train_models
    from clipmech.study.registry import Registry

    lines, walls = [], {}
    for workers in (1, 2):
        o = replace(opts, out=tempfile.mkdtemp(prefix=f"qs-workers{workers}-"), epochs=epochs, train_workers=workers)
        study = Study(o, registry=Registry(Path(o.out) / "registry"))
        study.dataset, domains, study.c2 = resolve_dataset(o)
        specs = model_specs(o, domains)[:n_models]
        t0 = time.perf_counter()
        train_models(study, specs)
        walls[workers] = time.perf_counter() - t0
        lines.append(f"train_workers={workers}: {n_models} models x {epochs} epochs in {walls[workers]:.1f} s")
    lines.append(f"2 one-thread workers vs 1 process: {walls[1] / walls[2]:.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=None, help="default: the quickstart's")
    ap.add_argument("--second-run", action="store_true", help="run again in the same folder (reuse check)")
    ap.add_argument("--stages", action="store_true", help="also print every stage")
    ap.add_argument("--data", action="store_true", help="only time the training input pipeline")
    ap.add_argument("--workers", action="store_true", help="only compare 1 vs 2 training workers")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per model for --workers")
    args = ap.parse_args()
    opts = replace(QuickstartOptions(out=args.out, progress=False),
                   **({"seeds": args.seeds} if args.seeds else {}))
    if args.data:
        print(data_pipeline(opts))
        return
    if args.workers:
        print(train_workers(opts, args.epochs))
        return
    for attempt in range(2 if args.second_run else 1):
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_quickstart(opts)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stages = res["extra"]["stages"]
        print(f"== run {attempt + 1}: {sum(t['reused'] for t in stages.values())} of {len(stages)} stages reused")
        print(summarize(stages, wall, cpu))
        if args.stages:
            print(json.dumps(stages, indent=1))


if __name__ == "__main__":
    main()
