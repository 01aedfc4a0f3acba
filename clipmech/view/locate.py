"""Where a study folder keeps what the view shows, and reading it without torch.

A study folder is a `clipmech quickstart` output (results.json, report.md, figures/, registry/) or a
`clipmech experiment analyse` output (the same files plus units/<run_id>/<unit>-<hash>/result.json);
one run's analysis folder (`clipmech analyze ...`, below) is shown as a study of one model.
Per model the view needs its CKA per analysis point and its circuits per (class, domain):

- models: a results row's `checkpoint_hash` names its weights; otherwise the registry's finished
  `train` stages do (their run folder is named `<model_id>-<8 hex>`).
- CKA: the registry's `cka` stage entries (key "checkpoint") or an analysis unit `cka-*`, both
  `clipmech.analysis.cka.domain_cka` results.
- circuits: the registry's `circuit_set` entries (key "model" = checkpoint hash, "split" "test" =
  the circuits the sharedness scores use) index `Circuit.save` files under
  registry/circuit_files/<entry hash>/; only their JSON half is read (points, selected nodes best
  first, edges with scores, meta), never the torch half.

A circuit file names its class in meta["class"] when its writer recorded it; older files only carry
the dataset's class index, which is mapped through the sorted class list of the rows and accepted
only when every index lands on one of the study's circuit classes (otherwise shown as "class #k").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from clipmech.view import results as R

RESULTS, REPORT = "results.json", "report.md"
RUN_FOLDER = re.compile(r"^(?P<model>.+)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class CircuitRef:
    """One circuit file of a model: (class, domain) and the path of its JSON half."""

    model_id: str
    class_name: str
    domain: str
    path: Path


def _entries(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, {"key", "result"}) of every readable registry entry in `folder` (others skipped)."""
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict):
            yield p, entry


def read_json(path: Path) -> Any:
    """A JSON file's content; raises ValueError naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); rerun the command that "
                         "wrote it") from None


def checkpoints(study: Path, rows: list[Mapping[str, Any]]) -> dict[str, str]:
    """{checkpoint hash: model id} from the rows and the registry's finished training stages."""
    ids = {R.model_id(r) for r in rows}
    out = {str(r["checkpoint_hash"]): R.model_id(r) for r in rows if r.get("checkpoint_hash")}
    for _, entry in _entries(study / "registry" / "train"):
        run_dir, ckpt = R.get(entry, "result", "run_dir"), R.get(entry, "result", "checkpoint_hash")
        m = RUN_FOLDER.match(Path(str(run_dir)).name) if run_dir and ckpt else None
        if m and m.group("model") in ids:
            out.setdefault(str(ckpt), m.group("model"))
    return out


def cka_results(study: Path, by_checkpoint: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{model id: domain_cka result} from registry `cka` entries and `units/<run_id>/cka-*` units."""
    out: dict[str, dict[str, Any]] = {}
    for _, entry in _entries(study / "registry" / "cka"):
        model = by_checkpoint.get(str(R.get(entry, "key", "checkpoint")))
        if model and isinstance(entry.get("result"), dict):
            out[model] = entry["result"]
    for p in sorted(study.glob("units/*/cka-*/result.json")):
        try:
            out.setdefault(p.parent.parent.name, read_json(p))
        except (OSError, ValueError):
            continue
    return out


def _class_of(index: str, meta_class: Any, names: list[str]) -> str | None:
    if isinstance(meta_class, str) and meta_class:
        return meta_class
    k = int(index) if str(index).isdigit() else -1
    return names[k] if 0 <= k < len(names) else None


def circuit_refs(study: Path, results: Mapping[str, Any], by_checkpoint: Mapping[str, str]) -> list[CircuitRef]:
    """Every test-split circuit of a known model, with its class named (see the module note)."""
    names, expected = R.class_names(results), set(R.circuit_class_names(results))
    found: list[tuple[str, str, str, Path, Any]] = []  # (model, class index, domain, path, meta class)
    for entry_path, entry in _entries(study / "registry" / "circuit_set"):
        model = by_checkpoint.get(str(R.get(entry, "key", "model")))
        index = entry.get("result")
        if not model or R.get(entry, "key", "split") != "test" or not isinstance(index, dict):
            continue
        folder = entry_path.parent.parent / "circuit_files" / entry_path.stem
        for domain, per in index.items():
            for k, name in (per.items() if isinstance(per, dict) else []):
                path = folder / str(name)
                if path.is_file():
                    found.append((model, str(k), str(domain), path, _meta_class(path)))
    # An index is trusted only when every circuit without a recorded name maps into the circuit classes.
    trusted = all(_class_of(k, None, names) in expected for _, k, _, _, mc in found if not mc)
    return [CircuitRef(model, _class_of(k, mc, names if trusted else []) or f"class #{k}", domain, path)
            for model, k, domain, path, mc in found]


def _meta_class(path: Path) -> str | None:
    try:
        return R.get(read_json(path), "meta", "class")
    except (OSError, ValueError):
        return None


def read_circuit(path: Path) -> dict[str, Any]:
    """The JSON half of a `Circuit.save` file: {"points", "nodes" {point: [index, best first]},
    "edges" [[up point, up index, down point, down index, score]], "n_images"}."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != "clipmech.circuit/1":
        raise ValueError(f"{path} is not a clipmech circuit file (format clipmech.circuit/1); rerun the analysis")
    try:
        points = [str(p) for p in data.get("points") or []]
        nodes = {p: [int(i) for i in (data.get("nodes") or {}).get(p, [])] for p in points}
        edges = [[str(u), int(i), str(d), int(j), R.number(w)] for u, i, d, j, w in data.get("edges") or []]
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} has malformed points, nodes or edges ({err}); rerun the analysis that wrote it") from None
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return {"points": points, "nodes": nodes, "edges": edges, "n_images": meta.get("images_used", meta.get("n_images"))}


def is_study(folder: Path) -> bool:
    """Whether `folder` holds a study's results.json (quickstart, experiment analyse)."""
    return (folder / RESULTS).is_file()


# ------------------------------------------------------------------------------------ one run's analyses
# `clipmech analyze ... RUN_DIR` writes into RUN_DIR/analysis (or --out): cka_<mode>.json (domain_cka
# results) and circuits_<label>/circuits/<domain>/<class>.json (Circuit.save files whose meta names
# domain and class), beside explain_<label>/explanations.json.
ANALYSIS_CIRCUITS = "circuits_*/circuits/*/*.json"


def is_analysis(folder: Path) -> bool:
    """Whether `folder` is one run's analysis folder (CKA or circuit files of `clipmech analyze`)."""
    return any(folder.glob("cka_*.json")) or any(folder.glob(ANALYSIS_CIRCUITS))


def analysis_model_id(folder: Path) -> str:
    """The run an analysis folder belongs to: RUN_DIR for RUN_DIR/analysis, else the folder's name."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "analysis" else folder.name


def analysis_cka(folder: Path) -> dict[str, Any] | None:
    """The folder's CKA result: cka_centroid.json (the paper's class-centroid CKA) when present, else
    the first cka_*.json."""
    found = sorted(folder.glob("cka_*.json"), key=lambda p: (p.name != "cka_centroid.json", p.name))
    for p in found:
        try:
            res = read_json(p)
        except (OSError, ValueError):
            continue
        if isinstance(res, dict):
            return res
    return None


def analysis_circuits(folder: Path, model_id: str) -> list[CircuitRef]:
    """The circuits of one circuits_<label> folder (the one with most circuits, then the last name:
    one label per run page), named by their meta (else by path)."""
    files = sorted(folder.glob(ANALYSIS_CIRCUITS))
    labels = sorted({p.parents[2] for p in files}, key=lambda f: (sum(p.parents[2] == f for p in files), f.name))
    refs = []
    for p in files:
        if p.parents[2] != labels[-1]:
            continue
        try:
            meta = read_json(p).get("meta") or {}
        except (OSError, ValueError, AttributeError):
            continue
        cls, domain = meta.get("class"), meta.get("domain")
        refs.append(CircuitRef(model_id, cls if isinstance(cls, str) else p.stem,
                               domain if isinstance(domain, str) else p.parent.name, p))
    return refs
