"""Paper-scale experiments: expand an `experiments/*.toml` file into training runs, launch each
through `torchrun` (skipping finished ones), evaluate them and redraw the figures from stored results.

An experiment file has four tables:

    [experiment]  name, figure (paper figure it reproduces), description, kind ("clip" | "supervised")
    [base]        a clipmech.train config (sections model/data/mixture/optim/schedule/train/eval)
                  shared by every run; strings may name data paths as "{domainnet}" etc.
    [matrix]      "section.key" = [values]; the runs are the cross product
    [launch]      nproc_per_node (GPUs per run), nnodes, rdzv_endpoint / rdzv_backend / rdzv_id
                  (torchrun, multi-node), launcher ("local" | "slurm"), partition, account,
                  gpus_per_job, cpus_per_job, mem_gb, time_min, max_parallel (SLURM via submitit)
    [analysis]    (kind = "analysis" only) source experiment file + clipmech.study.analyse options

Data paths are given on the command line (`--data domainnet=/data/domainnet`) and substituted into
every string of the resolved configs; an unfilled "{name}" is an error naming the missing --data.
Natural-only runs do not depend on the test domain: runs whose resolved configs coincide after
dropping it are trained once. Finished runs are recorded in a `Registry` keyed by the resolved config
(plus a `done` marker in the run folder), so rerunning the command skips them. Training runs and
analysis units go through clipmech.launch: in this process / torchrun, or SLURM job arrays.
"""
from __future__ import annotations

import copy
import itertools
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clipmech.checks import check_keys, check_typed
from clipmech.errors import ConfigError
from clipmech.study.registry import Registry
from clipmech.utils import PathLike, hash_obj, read_json

_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


TABLES = ("experiment", "base", "matrix", "launch", "analysis")
# [experiment] keys: what each means is in the module docstring and experiments/README.md
EXPERIMENT_KEYS = {"name": ("str", None), "figure": ("str", None), "description": ("str", None),
                   "kind": ("str", ("clip", "supervised", "analysis")), "base_tsv": ("str?", None),
                   "unsupported": ("str?", None)}


def load_experiment(path: PathLike) -> dict[str, Any]:
    """Read and check an experiment TOML file (tables experiment, base, matrix, launch, analysis).

    Every table and key is checked before anything runs: unknown names give the closest valid one,
    [base] and every matrix entry go through the run config's checks (ConfigError, exit 2)."""
    from clipmech.train.config import DEFAULTS, load_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist; see experiments/README.md")
    try:
        with open(path, "rb") as fh:
            exp = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"experiment file {path} is not valid TOML: {err}; fix that line") from err
    check_keys(str(path), exp, TABLES, what="table")
    for table in TABLES:
        if not isinstance(exp.setdefault(table, {}), dict):
            raise ConfigError(f"{path}: [{table}] must be a table, got {type(exp[table]).__name__}")
    e = exp["experiment"]
    check_keys(f"{path} [experiment]", e, EXPERIMENT_KEYS)
    if "name" not in e:
        raise ConfigError(f"{path}: [experiment] needs a name")
    for key, value in e.items():
        check_typed(f"{path}: [experiment] {key}", value, *EXPERIMENT_KEYS[key])
    _check_base(path, exp["base"], load_config)
    for key, values in exp["matrix"].items():
        section, _, name = key.partition(".")
        if not name or not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: matrix entry {key!r} must be \"section.key\" = [non-empty list]")
        check_keys(f"{path} [matrix] {key!r}", [section], DEFAULTS, what="section")
        check_keys(f"{path} [matrix] {key!r}", [name], DEFAULTS[section], what=f"key of [{section}]")
    return exp


def _check_base(path: Path, base: dict[str, Any], load_config: Any) -> None:
    """The [base] tables through the run config's key, type and range checks (placeholders like
    "{domainnet}" are strings, which those checks accept); errors are prefixed with the file."""
    try:
        load_config(copy.deepcopy(base))
    except ConfigError as err:
        raise ConfigError(f"{path}: [base] {err}") from err


def _fill(obj: Any, data: Mapping[str, str], where: str) -> Any:
    """Substitute "{name}" data paths in every string of `obj`."""
    if isinstance(obj, dict):
        return {k: _fill(v, data, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, data, where) for v in obj]
    if isinstance(obj, str):
        missing = [m for m in _PLACEHOLDER.findall(obj) if m not in data]
        if missing:
            raise ConfigError(f"{where} = {obj!r} needs data path(s) {missing}; pass "
                             + " ".join(f"--data {m}=/path" for m in missing))
        return _PLACEHOLDER.sub(lambda m: str(data[m.group(1)]), obj)
    return obj


def expand_runs(exp: Mapping[str, Any], data: Mapping[str, str] | None = None,
                without_base: bool = False) -> list[dict[str, Any]]:
    """The experiment's distinct runs: [{"id", "config"}] (config = resolved train config, no out).

    [experiment] base_tsv (e.g. "{imagenet_captions}") becomes every run's [data] base, the paper's
    base image-text pairs; without_base leaves it out (ids get -nobase; not the paper's setting)."""
    keys = list(exp["matrix"])
    base_tsv = exp["experiment"].get("base_tsv")
    runs: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*(exp["matrix"][k] for k in keys)):
        cfg = copy.deepcopy(exp["base"])
        for key, value in zip(keys, values):
            section, name = key.split(".", 1)
            cfg.setdefault(section, {})[name] = value
        if cfg.get("mixture", {}).get("setup") == "natural_only":
            cfg["mixture"].pop("test_domain", None)  # one natural-only model serves every test domain
        if base_tsv and not without_base:
            cfg.setdefault("data", {})["base"] = base_tsv
        cfg = _fill(cfg, data or {}, exp["experiment"]["name"])
        run_id = _run_id(cfg) + ("-nobase" if base_tsv and without_base else "")
        runs.setdefault(hash_obj(cfg), {"id": run_id, "config": cfg})
    return list(runs.values())


def _run_id(cfg: Mapping[str, Any]) -> str:
    m, t = cfg.get("mixture", {}), cfg.get("train", {})
    parts = [cfg.get("model", {}).get("name", "model"), m.get("setup", "run")]
    for k in ("test_domain", "allow_p"):
        if m.get(k) is not None:
            parts.append(f"{k.split('_')[0]}{m[k]}")
    if m.get("domains"):
        parts.append(m["domains"])
    if m.get("aligned"):
        parts.append("aligned")
    if m.get("in_sketch"):
        parts.append("insketch" + (f"-{m['in_sketch_keep']}" if m.get("in_sketch_keep") else ""))
    if t.get("objective") == "supervised":
        parts.append("sup")
    parts.append(f"s{t.get('seed', 0)}")
    return "-".join(str(p) for p in parts) + "-" + hash_obj(cfg)[:6]


def check_supported(exp: Mapping[str, Any]) -> None:
    """Refuse, with the reason, what `run_experiment` cannot run: analyses (they have their own
    command) and experiments whose [experiment] `unsupported` names a missing library piece."""
    e = exp["experiment"]
    if e.get("kind") == "analysis":
        raise ConfigError(f"experiment {e['name']!r} is an analysis; run it with `clipmech experiment analyze`")
    if e.get("unsupported"):
        raise ValueError(f"experiment {e['name']!r} cannot run yet: {e['unsupported']}")


def train_and_evaluate(cmd: list[str], run_dir: str, evaluate: bool) -> dict[str, Any]:
    """A training unit: run the torchrun command, then (if asked) the zero-shot evaluation of every
    checkpoint, so a cluster job leaves a run ready for analysis."""
    from clipmech.launch.torchrun import run_command
    from clipmech.locks import unit_lock
    # One writer per run: a second process (another launcher, a resubmitted job) is refused with the
    # holder named instead of training into the same folder.
    with unit_lock(run_dir, "experiment"):
        run_command(cmd)
        if evaluate:
            from clipmech.eval.zeroshot import evaluate_run
            evaluate_run(run_dir)
    return {"run_dir": run_dir, "command": cmd}


def run_experiment(path: PathLike, out: PathLike = "runs/experiments", data: Mapping[str, str] | None = None,
                   nproc: int | None = None, dry_run: bool = False, evaluate: bool = True,
                   without_base: bool = False, launch: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train (via torchrun) and evaluate every unfinished run of the experiment; returns the run table.

    Each run lives in OUT/<experiment>/<run id>/ and is one unit (clipmech.launch) launched locally or
    as a SLURM job; `launch` overrides the file's [launch] table (launcher, partition, ...). A run is
    skipped when the registry records it as finished and its `done` marker exists. With dry_run the
    commands are printed, nothing runs.
    """
    from clipmech.launch import Unit, run_units
    from clipmech.launch.launcher import TORCHRUN_KEYS, launch_options
    from clipmech.launch.torchrun import torchrun_command
    from clipmech.train.config import load_config, save_config

    exp = load_experiment(path)
    check_supported(exp)
    name = exp["experiment"]["name"]
    root = Path(out) / name
    registry = Registry(Path(out) / "registry")
    launch = {k: v for k, v in (launch or {}).items() if v is not None}
    torchrun_opts = {**exp["launch"], **{k: launch.pop(k) for k in TORCHRUN_KEYS if k in launch}}
    opts = launch_options(exp["launch"], folder=str(root / "submitit"), **launch)
    nproc = nproc or int(torchrun_opts.get("nproc_per_node", 1))
    nnodes = int(torchrun_opts.get("nnodes", 1))
    table, units = [], []
    for run in expand_runs(exp, data, without_base):
        run_dir = root / run["id"]
        cfg = load_config(run["config"], {"train": {"out": str(run_dir)}})  # validates keys before any launch
        key = {"stage": "experiment-train", "config": run["config"]}
        done = registry.get("experiment-train", key) is not None and (run_dir / "done").is_file()
        cmd = torchrun_command(str(run_dir / "config.toml"), str(run_dir), nproc, nnodes, torchrun_opts)
        print(f"[{name}] {run['id']}: {'finished' if done else 'to run'}" + ("" if done else f"\n    {shlex.join(cmd)}"),
              flush=True)
        if done and evaluate and not dry_run and not (run_dir / "eval" / "results.json").is_file():
            from clipmech.eval.zeroshot import evaluate_run
            evaluate_run(run_dir)
        if not done:
            if not dry_run:
                save_config(cfg, run_dir / "config.toml")
            units.append((key, Unit(run["id"], str(run_dir / "unit"), train_and_evaluate, (cmd, str(run_dir), evaluate),
                                    gpus=nproc, nodes=nnodes)))
        table.append({"id": run["id"], "run_dir": str(run_dir), "config": run["config"], "finished": done or not dry_run})
    run_units([u for _, u in units], opts, stage=f"{name} train", dry_run=dry_run)
    if not dry_run:
        for key, u in units:
            registry.put("experiment-train", key, {"run_dir": str(Path(u.folder).parent)})
    return table


def collect_accuracies(table: Sequence[Mapping[str, Any]], metric: str = "top1_balanced"
                       ) -> dict[str, dict[str, list[float]]]:
    """{setup: {test_domain: [C2 accuracy of the last epoch per seed]}} from the runs' eval/results.json.

    Natural-only runs (no test domain) contribute to every test domain present in the table.
    """
    domains = sorted({r["config"]["mixture"]["test_domain"] for r in table
                      if r["config"].get("mixture", {}).get("test_domain")})
    acc: dict[str, dict[str, list[float]]] = {}
    for r in table:
        path = Path(r["run_dir"]) / "eval" / "results.json"
        if not path.is_file():
            continue
        res = read_json(path, f"evaluate the run again with `clipmech eval {r['run_dir']}`")
        last = res[max(res, key=int)]
        m = r["config"].get("mixture", {})
        for d in ([m["test_domain"]] if m.get("test_domain") else domains):
            value = last.get(f"{d}/C2/{metric}")
            if value is not None:
                acc.setdefault(m.get("setup", "run"), {}).setdefault(d, []).append(value)
    return acc


def redraw_figures(path: PathLike, out: PathLike = "runs/experiments", data: Mapping[str, str] | None = None,
                   without_base: bool = False) -> list[Path]:
    """Figure-2-style bars (and accuracy curves) of an experiment from its stored evaluation results."""
    from clipmech.study import figures as F

    exp = load_experiment(path)
    name = exp["experiment"]["name"]
    root = Path(out) / name
    table = [{"id": r["id"], "run_dir": str(root / r["id"]), "config": r["config"]}
             for r in expand_runs(exp, data, without_base)]
    acc = collect_accuracies(table)
    if not acc:
        raise FileNotFoundError(f"no evaluated runs of {name!r} under {root}; run `clipmech experiment run {path}` first")
    return [F.grouped_bars(acc, root / "figures" / "c2_accuracy.png",
                           title=f"{name}: C2 accuracy per setup and test domain ({exp['experiment'].get('figure', '')})")]


def analyse_experiment(path: PathLike, out: PathLike = "runs/experiments", data: Mapping[str, str] | None = None,
                       without_base: bool = False, launch: Mapping[str, Any] | None = None, dry_run: bool = False,
                       options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The mechanistic study of every trained run of an analysis experiment's [analysis] source.

    Each run is analysed from its own config (clipmech.study.analyse); `options` override the file's
    [analysis] keys. Units run in two stages (extraction + circuits, then CKA / SAE / embeddings from
    the shards) through the launcher; finished units are reused. Writes OUT/<experiment>/results.json,
    report.md and figures/ with the quickstart's schema, statistics and verdicts; returns the results
    (None on dry_run).
    """
    from clipmech.launch import run_units
    from clipmech.launch.launcher import launch_options
    from clipmech.study import analyse as A

    exp = load_experiment(path)
    if exp["experiment"].get("kind") != "analysis" or "source" not in exp.get("analysis", {}):
        raise ConfigError(f"{path} is not an analysis experiment ([experiment] kind = \"analysis\", [analysis] source)")
    table = dict(exp["analysis"])
    source = Path(path).parent / table.pop("source")
    opts = A.analysis_options(table, **dict(options or {}))
    src = load_experiment(source)
    dest = Path(out) / exp["experiment"]["name"]
    launch_opts = launch_options(exp["launch"], folder=str(dest / "submitit"), **dict(launch or {}))
    if launch_opts.launcher == "local":
        A.check_device_here(opts)
    runs = _trained_runs(src, Path(out) / src["experiment"]["name"], data, without_base, source)
    figure_run = next((r for r in runs if r["setup"] == "cg_high"), runs[0])
    plans = {}
    for r in runs:
        r["ctx"] = A.RunContext(r["run_dir"], opts)
        plans[r["id"]] = A.plan_units(r["ctx"], dest, r["id"], with_umap=r is figure_run,
                                      test_domains=r["test_domains"])
    first = [u for p in plans.values() for n, u in p.items() if n.split("/")[0] in A.FIRST_STAGE]
    second = [u for p in plans.values() for n, u in p.items() if n.split("/")[0] not in A.FIRST_STAGE]
    name = exp["experiment"]["name"]
    run_units(first, launch_opts, stage=f"{name} extract+circuits", dry_run=dry_run)
    run_units(second, launch_opts, stage=f"{name} {A.stage_label(second)}", dry_run=dry_run)
    if dry_run:
        return None
    measures = {r["id"]: A.collect(plans[r["id"]], r["ctx"].source.c2) for r in runs}
    return _write_study(exp, src, runs, measures, figure_run, opts, dest)


def _trained_runs(src: Mapping[str, Any], root: Path, data: Mapping[str, str] | None, without_base: bool,
                  source: Path) -> list[dict[str, Any]]:
    """The source experiment's runs with setup, seed and the test domains each serves (natural-only:
    every test domain of the experiment). Raises FileNotFoundError naming an untrained run."""
    runs = expand_runs(src, data, without_base)
    domains = sorted({r["config"].get("mixture", {}).get("test_domain") for r in runs} - {None})
    out = []
    for r in runs:
        run_dir = root / r["id"]
        if not (run_dir / "done").is_file():
            raise FileNotFoundError(f"{run_dir} has not finished training; run `clipmech experiment run {source}` first")
        m = r["config"].get("mixture", {})
        served = [m["test_domain"]] if m.get("test_domain") else domains
        if not served:
            raise ValueError(f"run {r['id']} names no test domain and no other run of {source} does")
        out.append({"id": r["id"], "run_dir": str(run_dir), "setup": m.get("setup", "run"),
                    "seed": int(r["config"].get("train", {}).get("seed", 0)), "test_domains": served})
    return out


def _write_study(exp: Mapping[str, Any], src: Mapping[str, Any], runs: Sequence[Mapping[str, Any]],
                 measures: Mapping[str, Mapping[str, Any]], figure_run: Mapping[str, Any], opts: Any,
                 dest: Path) -> dict[str, Any]:
    """Model rows -> clipmech.study.report's results (statistics, verdicts) -> results.json, report.md
    and the quickstart's figures in DEST."""
    from dataclasses import asdict

    from clipmech.study import analyse as A
    from clipmech.study import quickstart as Q
    from clipmech.study.controls import FIGURE_NOTES as CONTROLS_FIGURES
    from clipmech.study.controls import draw_controls_figures
    from clipmech.study.provenance import provenance
    from clipmech.study.report import build_results, write_outputs

    rows, curves = [], {}
    for r in runs:
        m = measures[r["id"]]
        got, c = A.model_rows(r["ctx"], r["setup"], r["seed"], r["test_domains"], r["id"], m["cka"],
                              m["circuits"], m["sharing"], m["embeddings"], m["controls"])
        rows += got
        for d, curve in c.items():
            curves.setdefault(d, {}).setdefault(r["setup"], []).append(curve)
    epochs, points = _curve_grid([c for per in curves.values() for cs in per.values() for c in cs])
    grid = {d: {s: [[c[e] for e in Q.curve_epochs(epochs, points)] for c in cs] for s, cs in per.items()}
            for d, per in curves.items()}
    config = {"experiment": exp["experiment"]["name"], "source": src["experiment"]["name"],
              "analysis": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
              "image_sizes": sorted({row["image_size"] for row in rows}), "epochs": epochs, "curve_points": points,
              "c2_classes": rows[0]["c2_classes"], "test_domains": sorted({row["test_domain"] for row in rows})}
    circuits = {r["id"]: measures[r["id"]]["circuits"]["subsets"] for r in runs}  # all / C2 / C1, as the paper
    ctx = figure_run["ctx"]
    results = build_results(rows, config=config, extra={"runs": [r["id"] for r in runs], "circuits": circuits},
                            provenance=provenance(ctx.source.dataset, ctx.device))
    spec = Q.ModelSpec(figure_run["setup"], figure_run["seed"], figure_run["test_domains"][0])
    fm = measures[figure_run["id"]]
    Q.draw_figures(results, grid, {"cka": fm["cka"], "circuits": fm["circuits"], "sharing": fm["sharing"],
                                   "emb": fm["embeddings"]}, spec, ctx.source.dataset.domains, dest / "figures")
    notes = dict(Q.FIGURE_NOTES)
    if opts.controls:
        draw_controls_figures(results["models"], dest / "figures")
        notes |= CONTROLS_FIGURES
    write_outputs(results, dest, {f"figures/{k}": v for k, v in notes.items()})
    return results


def _curve_grid(curves: Sequence[Mapping[int, float]]) -> tuple[int, int]:
    """(epochs, points) such that quickstart.curve_epochs(epochs, points) picks only epochs every run
    evaluated, with as many points as possible (0 and the last epoch always exist)."""
    from clipmech.study.quickstart import curve_epochs
    common = set.intersection(*(set(c) for c in curves))
    last = max(common)
    for k in range(len(common), 1, -1):
        if set(curve_epochs(last, k)) <= common:
            return last, k
    return last, 2
