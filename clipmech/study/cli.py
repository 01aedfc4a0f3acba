"""`clipmech quickstart` (and `clipmech experiment`) subcommands."""
from __future__ import annotations

import argparse


# Hidden quickstart flags: QuickstartOptions fields with scalar values (kept in sync by construction).
_TUNABLE = {"views": int, "epochs": int, "batch_size": int, "lr": float, "image_size": int, "curve_points": int,
            "n_templates": int, "max_classes": int, "circuit_steps": int, "circuit_classes": int,
            "sae_expansion": int, "sae_steps": int, "cka_boot": int, "n_c2": int,
            "reference_images": int}


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
    p.add_argument("--seeds", type=int, default=None, help="training seeds per setup (default 3)")
    p.add_argument("--full", action="store_true", help="every non-natural test domain")
    p.add_argument("--quiet", action="store_true", help="no stage progress display")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--model", default=None, help="model preset or open_clip config (default: tiny-rn)")
    p.add_argument("--dataset", default=None, metavar="ROOT",
                   help="a DomainNet-layout folder instead of the embedded emoji domains: the same preset, "
                        "test domains clipart and painting where present, C2 = the paper's classes it holds "
                        "(extended by the smallest sha256 of the name), sizes capped to its classes")
    p.add_argument("--circuit-method", default=None, metavar="METHOD",
                   help="circuit discovery: paper_ig (default, the paper's integrated gradients) or eap_ig "
                        "(EAP-IG, the edge method docs/circuit_validity.md recommends; exploratory)")
    # Every other QuickstartOptions field as a hidden flag (--epochs, --max-classes, ...): reduced
    # runs for tests and smoke checks, not part of the user-facing interface.
    for name, ftype in _TUNABLE.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=ftype, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_quickstart)

    i = subparsers.add_parser(
        "interpolation", help="domain interpolation: CG-low plus every subset of the other domains, 5 seeds, "
                              "a dose-response test of finding 3 (~60 min on a 2-core CPU)",
        description="Train CG-low plus every subset of the other domains (a 2^k factorial in the added domains), "
                    "LOD, natural-only and a steps-matched natural-only with the quickstart's trainer, run the "
                    "per-run analysis on every model, and judge finding 3 by the interpolation analysis plan "
                    "(dose slopes, domain-inclusion effects, a mixed model, a threshold test). Writes "
                    "results.json, report.md and figures/. A rerun reuses every finished model and stage.")
    i.add_argument("--out", default="runs/interpolation", help="output folder (default: runs/interpolation)")
    i.add_argument("--test-domain", default=None, metavar="D",
                   help="test domain (default: the plan's rule, the dataset's default test domain: on the emoji "
                        "data the largest DG gap of its own check, quickdraw)")
    i.add_argument("--seeds", type=int, default=5, help="training seeds per mixture (default 5)")
    i.add_argument("--design", choices=["full", "half"], default="full",
                   help="full: every subset of the added domains; half: the even-sized ones (a half fraction)")
    i.add_argument("--dataset", default=None, metavar="ROOT", help="a DomainNet-layout folder instead of the emoji data")
    i.add_argument("--model", default=None, help="model preset (default: tiny-rn)")
    i.add_argument("--quiet", action="store_true", help="no stage progress display")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    g = i.add_argument_group("paper scale (the same study on DomainNet with RN50, through `clipmech experiment run`)")
    g.add_argument("--paper", action="store_true",
                   help="train the paper-scale interpolation (clipart, sketch: the paper's listed mixtures) instead")
    g.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="data paths: domainnet=/data/domainnet imagenet_captions=/data/in_captions.tsv")
    g.add_argument("--launcher", choices=["local", "slurm"], default=None, help="local (default) or slurm")
    g.add_argument("--dry-run", action="store_true", help="print the runs and commands, run nothing")
    g.add_argument("--analyse", action="store_true",
                   help="with --paper: analyse the trained runs (experiment analyse) and judge them by the plan")
    for name, ftype in _TUNABLE.items():
        i.add_argument("--" + name.replace("_", "-"), dest=name, type=ftype, default=None, help=argparse.SUPPRESS)
    i.set_defaults(func=_interpolation)

    r = subparsers.add_parser(
        "report", help="recompute a run's statistics, verdicts and report.md from its stored per-model results",
        description="Read RUN_DIR/results.json (written by `clipmech quickstart` or `experiment analyse`), "
                    "recompute its correlations, findings and power from the per-model rows (no training or "
                    "analysis), and rewrite RUN_DIR/results.json and RUN_DIR/report.md.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="folder holding results.json")
    r.add_argument("--n-boot", type=int, default=2000,
                   help="bootstrap resamples to start with; doubled near a threshold, up to 64000 (default 2000)")
    r.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed (verdicts do not depend on it)")
    r.add_argument("--plan", metavar="FILE", default=None,
                   help="judge under this analysis plan (TOML like clipmech/study/plans/plan-v1.toml) instead of "
                        "the shipped one; the report is then labelled exploratory")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.set_defaults(func=_report)

    e = subparsers.add_parser(
        "experiment", help="run a paper-scale experiment from experiments/*.toml (torchrun, resumable)",
        description="run: train (torchrun) and evaluate every unfinished run; figures: redraw from stored "
                    "results; analyze (or analyse): mechanistic analyses of trained runs. See experiments/README.md.")
    e.add_argument("action", choices=["run", "figures", "analyze"], type=lambda a: "analyze" if a == "analyse" else a)
    e.add_argument("file", help="experiment file, e.g. experiments/main.toml")
    e.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="data path for a {NAME} placeholder, e.g. domainnet=/data/domainnet (repeatable)")
    e.add_argument("--out", default="runs/experiments", help="output root (default: runs/experiments)")
    e.add_argument("--nproc", type=int, default=None, help="GPUs per run (default: the file's [launch])")
    e.add_argument("--dry-run", action="store_true", help="print the runs and commands, run nothing")
    e.add_argument("--without-base", action="store_true",
                   help="leave out the [experiment] base_tsv (ImageNet-Captions / CC) and train on the DomainNet "
                        "part alone; not the paper's setting, run ids get -nobase")
    e.add_argument("--launcher", choices=["local", "slurm"], default=None,
                   help="local: run here (default); slurm: one job per run / analysis unit through submitit")
    s = e.add_argument_group("scheduler (override the file's [launch]; see experiments/README.md)")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--gpus-per-job", type=int, default=None, dest="gpus_per_job",
                   help="GPUs per job (default: nproc_per_node for training, 1 for analysis units, 0 with --device cpu)")
    s.add_argument("--cpus-per-job", type=int, default=None, dest="cpus_per_job", help="CPUs per job (default 8)")
    s.add_argument("--mem-gb", type=int, default=None, dest="mem_gb", help="memory per job in GB")
    s.add_argument("--time-min", type=int, default=None, dest="time_min", help="time limit per job in minutes (default 240)")
    s.add_argument("--max-parallel", type=int, default=None, dest="max_parallel", help="array tasks running at once")
    s.add_argument("--nnodes", type=int, default=None, help="run: nodes per training run (torchrun --nnodes)")
    s.add_argument("--rdzv-endpoint", default=None, dest="rdzv_endpoint",
                   help="run: torchrun rendezvous HOST:PORT for multi-node runs (default: the job's first node)")
    s.add_argument("--submitit-cluster", default=None, dest="cluster", help=argparse.SUPPRESS)  # "local": tests
    a = e.add_argument_group("analyse (override the file's [analysis])")
    a.add_argument("--device", default=None, help="auto (GPU when present), cpu, cuda or cuda:N")
    a.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="activation extraction precision (attributions stay fp32)")
    a.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images")
    a.add_argument("--paper-compat", action="store_true", default=None, dest="paper_compat",
                   help="reproduce the paper code's quirks (CKA all/C1 rows from painting's class list, WL \"h2\" = "
                        "3 iterations, wrap-around edges; [analysis] paper_compat); recorded in results.json")
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
        test_domains = test_domains or full_test_domains(args.dataset or opts.dataset)
    changes = {"test_domains": test_domains, "seeds": args.seeds or opts.seeds} | _quickstart_changes(args)
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


def _quickstart_changes(args: argparse.Namespace) -> dict:
    """The QuickstartOptions fields set on the command line (model, dataset and the hidden tunables)."""
    names = ("model", "dataset", "circuit_method", *_TUNABLE)
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _interpolation(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipmech.locks import unit_lock
    from clipmech.study.interpolation import InterpolationOptions, run_interpolation
    from clipmech.study.quickstart import QuickstartOptions

    if args.seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (seeds are the unit the statistics resample), got {args.seeds}")
    if args.analyse and not args.paper:
        raise ValueError("--analyse applies with --paper (the toy study analyses its models itself)")
    if args.paper:
        from clipmech.study.interpolation import analyse_paper_interpolation, plan_paper_interpolation
        if args.test_domain is None:
            raise ValueError("--paper needs --test-domain (the paper studied clipart and sketch)")
        if args.analyse:
            res = analyse_paper_interpolation(args.test_domain, args.out, _parse_data(args.data),
                                              {"launcher": args.launcher}, args.dry_run)
            if res is not None:
                print(f"clipmech interpolation --paper --analyse: finding 3 from this design: "
                      f"{res['verdict']['verdict']}: {res['verdict']['text']}")
            return 0
        path = plan_paper_interpolation(args.test_domain, args.seeds, args.design, args.out, _parse_data(args.data),
                                        {"launcher": args.launcher}, args.dry_run)
        print(f"clipmech interpolation --paper: {path}; then `clipmech interpolation --paper --analyse` with the "
              "same options analyses the trained runs and judges them by the plan")
        return 0
    base = replace(QuickstartOptions(progress=not args.quiet), **_quickstart_changes(args)).validate()
    opts = InterpolationOptions(out=args.out, test_domain=args.test_domain, seeds=args.seeds, design=args.design,
                                base=base)
    with unit_lock(opts.out, "interpolation", recursive=True):
        results = run_interpolation(opts)
    print(f"clipmech interpolation: wrote {args.out}/report.md, results.json and figures/ "
          f"({results['extra']['models']} models, {results['extra']['wall_time_s']:.0f}s)")
    print(f"  finding 3 from this design: {results['verdict']['verdict']}: {results['verdict']['text']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipmech.errors import BadInputError, ConfigError
    from clipmech.study.analysis_plan import load_plan
    from clipmech.study.report import recompute, write_outputs
    from clipmech.utils import read_json

    path = Path(args.run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; RUN_DIR must be a folder written by `clipmech quickstart` "
                                "or `clipmech experiment analyse`")
    if args.n_boot < 100:
        raise ConfigError(f"--n-boot must be >= 100, got {args.n_boot}")
    stored = read_json(path, "restore it from a backup or rerun the command that wrote it")
    if not isinstance(stored, dict):
        raise BadInputError(f"{path} holds a JSON {type(stored).__name__}, not the results object written by "
                            "`clipmech quickstart` / `experiment analyse`; check the path")
    plan = load_plan(args.plan)
    results = recompute(stored, n_boot=args.n_boot, boot_seed=args.boot_seed, plan=plan)
    write_outputs(results, args.run_dir)
    print(f"clipmech report: rewrote {args.run_dir}/report.md and results.json (plan {plan.sha256}: "
          f"{results['plan']['status']})")
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
    if args.paper_compat and args.action != "analyze":
        raise ValueError("--paper-compat applies to `experiment analyse`; training runs take the allow-p quota quirk "
                         "from [base.analysis] paper_compat = true in the experiment file")
    launch = {k: getattr(args, k) for k in ("launcher", "partition", "account", "gpus_per_job", "cpus_per_job",
                                            "mem_gb", "time_min", "max_parallel", "cluster")}
    if args.action == "run":
        X.run_experiment(args.file, args.out, data, nproc=args.nproc, dry_run=args.dry_run,
                         without_base=args.without_base,
                         launch=launch | {"nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint})
    elif args.action == "figures":
        for path in X.redraw_figures(args.file, args.out, data, args.without_base):
            print(f"wrote {path}")
    else:
        results = X.analyse_experiment(args.file, args.out, data, args.without_base, launch, args.dry_run,
                                       {"device": args.device, "precision": args.precision, "workers": args.workers,
                                        "paper_compat": args.paper_compat})
        if results is not None:
            print(f"clipmech experiment analyse: wrote results.json, report.md and figures/ for "
                  f"{len(results['models'])} model rows")
            for f in results["findings"]:
                print(f"  {f['finding']}: {f['verdict']}")
    return 0
