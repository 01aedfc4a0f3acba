"""Paper-scale experiments: expand an `experiments/*.toml` file into training runs, launch each
through `torchrun` (skipping finished ones), evaluate them and redraw the figures from stored results.

An experiment file has four tables:

    [experiment]  name, figure (paper figure it reproduces), description, kind ("clip" | "supervised")
    [base]        a clipmech.train config (sections model/data/mixture/optim/schedule/train/eval)
                  shared by every run; strings may name data paths as "{domainnet}" etc.
    [matrix]      "section.key" = [values]; the runs are the cross product
    [launch]      nproc_per_node (GPUs per run), nnodes

Data paths are given on the command line (`--data domainnet=/data/domainnet`) and substituted into
every string of the resolved configs; an unfilled "{name}" is an error naming the missing --data.
Natural-only runs do not depend on the test domain: runs whose resolved configs coincide after
dropping it are trained once. Finished runs are recorded in a `Registry` keyed by the resolved config
(plus a `done` marker in the run folder), so rerunning the command skips them.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clipmech.study.registry import Registry
from clipmech.utils import PathLike, hash_obj

_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def load_experiment(path: PathLike) -> dict[str, Any]:
    """Read and check an experiment TOML file (tables experiment, base, matrix, launch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist; see experiments/README.md")
    with open(path, "rb") as fh:
        exp = tomllib.load(fh)
    unknown = set(exp) - {"experiment", "base", "matrix", "launch", "analysis"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; valid: experiment, base, matrix, launch, analysis")
    if "name" not in exp.get("experiment", {}):
        raise ValueError(f"{path}: [experiment] needs a name")
    for key, values in exp.get("matrix", {}).items():
        if "." not in key or not isinstance(values, list) or not values:
            raise ValueError(f"{path}: matrix entry {key!r} must be \"section.key\" = [non-empty list]")
    exp.setdefault("base", {})
    exp.setdefault("matrix", {})
    exp.setdefault("launch", {})
    return exp


def _fill(obj: Any, data: Mapping[str, str], where: str) -> Any:
    """Substitute "{name}" data paths in every string of `obj`."""
    if isinstance(obj, dict):
        return {k: _fill(v, data, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, data, where) for v in obj]
    if isinstance(obj, str):
        missing = [m for m in _PLACEHOLDER.findall(obj) if m not in data]
        if missing:
            raise ValueError(f"{where} = {obj!r} needs data path(s) {missing}; pass "
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
        raise ValueError(f"experiment {e['name']!r} is an analysis; run it with `clipmech experiment analyse`")
    if e.get("unsupported"):
        raise ValueError(f"experiment {e['name']!r} cannot run yet: {e['unsupported']}")


def launch_command(config_path: Path, run_dir: Path, nproc: int, nnodes: int = 1) -> list[str]:
    """The torchrun command training one run (resumes from latest.pt when the run was interrupted)."""
    cmd = ["torchrun", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1:
        cmd.append("--standalone")
    return cmd + ["-m", "clipmech.cli", "train", "--config", str(config_path), "--out", str(run_dir), "--resume"]


def run_experiment(path: PathLike, out: PathLike = "runs/experiments", data: Mapping[str, str] | None = None,
                   nproc: int | None = None, dry_run: bool = False, evaluate: bool = True,
                   without_base: bool = False) -> list[dict[str, Any]]:
    """Train (via torchrun) and evaluate every unfinished run of the experiment; returns the run table.

    Each run lives in OUT/<experiment>/<run id>/. A run is skipped when the registry records it as
    finished and its `done` marker exists. With dry_run the commands are printed, nothing runs.
    """
    from clipmech.train.config import load_config

    exp = load_experiment(path)
    check_supported(exp)
    name = exp["experiment"]["name"]
    root = Path(out) / name
    registry = Registry(Path(out) / "registry")
    nproc = nproc or int(exp["launch"].get("nproc_per_node", 1))
    table = []
    for run in expand_runs(exp, data, without_base):
        run_dir = root / run["id"]
        cfg = load_config(run["config"], {"train": {"out": str(run_dir)}})  # validates keys before any launch
        key = {"stage": "experiment-train", "config": run["config"]}
        done = registry.get("experiment-train", key) is not None and (run_dir / "done").is_file()
        status = "finished" if done else "to run"
        cmd = launch_command(run_dir / "config.toml", run_dir, nproc, int(exp["launch"].get("nnodes", 1)))
        print(f"[{name}] {run['id']}: {status}" + ("" if done else f"\n    {shlex.join(cmd)}"), flush=True)
        finished = done or not dry_run
        if not dry_run:
            finished = _run_unit(run_dir, cfg, cmd, done, evaluate, lambda: registry.put(
                "experiment-train", key, {"run_dir": str(run_dir)}), f"[{name}] {run['id']}")
        table.append({"id": run["id"], "run_dir": str(run_dir), "config": run["config"], "finished": finished})
    return table


def _run_unit(run_dir: Path, cfg: dict, cmd: list[str], done: bool, evaluate: bool, record, tag: str) -> bool:
    """Train (unless `done`) and evaluate one run while holding its experiment lock; False when
    another process holds it (that process is finishing the run, so this one moves on)."""
    from clipmech.locks import UnitLockedError, acquire, release
    from clipmech.train.config import save_config
    try:
        lock = acquire(run_dir, "experiment")
    except UnitLockedError as err:
        print(f"{tag}: skipped here, {err}", flush=True)
        return False
    try:
        if not done:
            save_config(cfg, run_dir / "config.toml")
            subprocess.run(cmd, check=True)
            record()
        if evaluate and not (run_dir / "eval" / "results.json").is_file():
            from clipmech.eval.zeroshot import evaluate_run
            evaluate_run(run_dir)
    finally:
        release(lock)
    return True


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
        res = json.loads(path.read_text())
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


def run_analyses(path: PathLike, out: PathLike = "runs/experiments", data: Mapping[str, str] | None = None,
                 without_base: bool = False) -> list[dict[str, Any]]:
    """Run the quickstart's per-model analyses (CKA, circuits, SAE sharing, embeddings) on every
    trained run of the [analysis] source experiment; results go to the shared registry."""
    from dataclasses import replace

    from clipmech.study import quickstart as Q

    exp = load_experiment(path)
    if exp["experiment"].get("kind") != "analysis" or "source" not in exp.get("analysis", {}):
        raise ValueError(f"{path} is not an analysis experiment ([experiment] kind = \"analysis\", [analysis] source)")
    a = dict(exp["analysis"])
    source = Path(path).parent / a.pop("source")
    src = load_experiment(source)
    root = Path(out) / src["experiment"]["name"]
    unknown = set(a) - set(Q.QuickstartOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown [analysis] keys {sorted(unknown)}")
    rows = []
    for run in expand_runs(src, data, without_base):
        run_dir = root / run["id"]
        epochs = run["config"].get("train", {}).get("epochs", 32)
        ckpt = run_dir / f"epoch_{epochs}.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt} is missing; train it with `clipmech experiment run {source}`")
        m = run["config"].get("mixture", {})
        opts = replace(Q.QuickstartOptions(out=str(Path(out) / exp["experiment"]["name"]),
                                           dataset=run["config"]["data"]["dataset"]), **a)
        study = Q.Study(opts, registry=Registry(Path(out) / "registry"))
        study.dataset, study.test_domains, study.c2 = Q.resolve_dataset(
            replace(opts, test_domains=(m["test_domain"],) if m.get("test_domain") else None))
        info = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "checkpoint_hash": Q.file_hash(ckpt)}
        model = Q.load_model(info)
        d = study.test_domains[0]
        cka_res, _ = Q.cka_model(study, info, model)
        circ, _ = Q.circuits_model(study, info, model)
        share, _ = Q.sae_sharing_model(study, info, model)
        emb, _ = Q.embeddings_model(study, info, model, with_umap=True)
        rows.append({"id": run["id"], "test_domain": d, "cka": cka_res, "circuits": circ, "sharing": share,
                     "embeddings": emb})
        print(f"[{exp['experiment']['name']}] analysed {run['id']}", flush=True)
    return rows
