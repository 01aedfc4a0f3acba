"""`clipmech quickstart` (and `clipmech experiment`) subcommands."""
from __future__ import annotations

import argparse


# Hidden quickstart flags: QuickstartOptions fields with scalar values (kept in sync by construction).
_TUNABLE = {"views": int, "epochs": int, "batch_size": int, "lr": float, "image_size": int, "curve_points": int,
            "n_templates": int, "max_classes": int, "circuit_steps": int, "circuit_classes": int,
            "sae_expansion": int, "sae_epochs": int, "cka_boot": int}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the study's subcommands to the `clipmech` parser."""
    p = subparsers.add_parser(
        "quickstart", help="run the whole study on the embedded emoji domains (sized for ~10 min on a 2-core CPU)",
        description="Train the four main setups with a tiny CLIP, evaluate DG/CG, run CKA, circuits, SAE "
                    "feature sharing and embedding analyses, relate sharedness to C2 accuracy, and write "
                    "figures, report.md and results.json. A rerun reuses finished stages.")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--test-domain", action="append", dest="test_domains", metavar="D",
                   help="test domain (repeatable; default: clipart and painting, where a 10-minute tiny "
                        "CLIP's held-out-class accuracy is above the floor)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per setup (default 1; 3 with --full)")
    p.add_argument("--full", action="store_true", help="every non-natural test domain and 3 seeds")
    p.add_argument("--quiet", action="store_true", help="no stage progress display")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--model", default=None, help="model preset or open_clip config (default tiny-vit)")
    # Every other QuickstartOptions field as a hidden flag (--epochs, --max-classes, ...): reduced
    # runs for tests and smoke checks, not part of the user-facing interface.
    for name, ftype in _TUNABLE.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=ftype, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_quickstart)

    e = subparsers.add_parser(
        "experiment", help="run a paper-scale experiment from experiments/*.toml (torchrun, resumable)",
        description="run: train (torchrun) and evaluate every unfinished run; figures: redraw from stored "
                    "results; analyse: mechanistic analyses of trained runs. See experiments/README.md.")
    e.add_argument("action", choices=["run", "figures", "analyse"])
    e.add_argument("file", help="experiment file, e.g. experiments/main.toml")
    e.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="data path for a {NAME} placeholder, e.g. domainnet=/data/domainnet (repeatable)")
    e.add_argument("--out", default="runs/experiments", help="output root (default: runs/experiments)")
    e.add_argument("--nproc", type=int, default=None, help="GPUs per run (default: the file's [launch])")
    e.add_argument("--dry-run", action="store_true", help="print the runs and commands, run nothing")
    e.add_argument("--without-base", action="store_true",
                   help="leave out the [experiment] base_tsv (ImageNet-Captions / CC) and train on the DomainNet "
                        "part alone; not the paper's setting, run ids get -nobase")
    e.add_argument("--debug", action="store_true", help="show tracebacks")
    e.set_defaults(func=_experiment)


def _quickstart(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipmech.study.quickstart import QuickstartOptions, full_test_domains, run_quickstart

    opts = QuickstartOptions(out=args.out, progress=not args.quiet)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    test_domains = tuple(args.test_domains) if args.test_domains else None
    if args.full:
        test_domains = test_domains or full_test_domains(opts.dataset)
    changes = {"test_domains": test_domains, "seeds": args.seeds or (3 if args.full else opts.seeds)}
    for name in ("model", *_TUNABLE):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    from clipmech.locks import unit_lock
    opts = replace(opts, **changes).validate()
    with unit_lock(opts.out, "quickstart", recursive=True):
        results = run_quickstart(opts)
    c2 = {}
    for m in results["models"]:
        c2.setdefault(m["setup"], []).append(m["c2_test_acc"])
    print(f"clipmech quickstart: wrote {args.out}/report.md, results.json and figures/ "
          f"in {results['extra']['wall_time_s']:.0f}s")
    print("C2 accuracy (class-balanced, mean over models): " +
          ", ".join(f"{s} {100 * sum(v) / len(v):.1f}%" for s, v in c2.items()))
    for f in results["findings"]:
        print(f"  {f['finding']}: {f['verdict']}")
    return 0


def _parse_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--data {item!r} must look like NAME=PATH, e.g. domainnet=/data/domainnet")
        out[name] = path
    return out


def _experiment(args: argparse.Namespace) -> int:
    from clipmech.study import experiments as X

    data = _parse_data(args.data)
    if args.action == "run":
        X.run_experiment(args.file, args.out, data, nproc=args.nproc, dry_run=args.dry_run,
                         without_base=args.without_base)
    elif args.action == "figures":
        for path in X.redraw_figures(args.file, args.out, data, args.without_base):
            print(f"wrote {path}")
    else:
        X.run_analyses(args.file, args.out, data, args.without_base)
    return 0
