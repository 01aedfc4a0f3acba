"""Writing a study folder's static site: DIR/view/index.html, its assets and one data file per page.

Browsers refuse fetch, XHR and ES modules on file://, so each page's data is a classic script
(`data/....js`) that hands its JSON to `CLIPMECH.data(path, value)`; the page script loads the one it
needs with a <script> tag when the page is opened. Data is per page, never one blob: the study page
(findings, accuracy table, model table, figures), one file per model (rows, CKA per point, causal
and faithfulness results), one per (model, class) with that class's circuit in every domain, one per
model with its node explanations. Figures and explanation images are copied in, so the folder is
self-contained and can be zipped, shared or served as is.

The site is built in a temporary folder beside the target and swapped in by renames, so a rerun
replaces it whole and a failed build leaves the previous site untouched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipmech.view import locate as L
from clipmech.view import results as R
from clipmech.view.explanations import find_explanations, read_explanations

SITE_FOLDER = "view"
ASSETS = Path(__file__).parent / "assets"
NEEDS = ("needs a study folder holding results.json (the output folder of `clipmech quickstart` or "
         "`clipmech experiment analyse`) or one run's analysis folder (RUN_DIR/analysis, written by "
         "`clipmech analyze cka|circuits|explain RUN_DIR`)")


class ViewInputError(ValueError):
    """The folder given to `clipmech view` is not one it can show (the message says what it needs)."""


@dataclass(frozen=True)
class Site:
    """What `build_site` wrote: the entry page, page counts, total bytes and build seconds."""

    index: Path
    models: int
    circuits: int
    explained_models: int
    bytes: int
    seconds: float


def _clean(v: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (a page shows them as not measured)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def slug(name: str) -> str:
    """A file-name-safe, unique stand-in for `name` (readable prefix + hash)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:40]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class _Writer:
    """Writes data scripts and copied files under the site root; paths returned are site-relative."""

    def __init__(self, root: Path):
        self.root = root

    def data(self, rel: str, value: Any) -> str:
        text = json.dumps(_clean(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"CLIPMECH.data({json.dumps(rel)}, {text});\n", encoding="utf-8")
        return rel

    def copy(self, src: Path, rel: str) -> str:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        return rel


# ------------------------------------------------------------------------------------ pages
def _figures(study: Path, results: Mapping[str, Any], w: _Writer) -> list[dict[str, str]]:
    """Every figure the results list (globs expanded; all figures/*.png when none are listed),
    copied into the site: [{"src", "caption", "name"}]."""
    listed = R.figures(results) or {str(p.relative_to(study)): "" for p in sorted((study / "figures").glob("*.png"))}
    out = []
    for pattern, caption in listed.items():
        inside = pattern and not pattern.startswith("/") and ".." not in pattern  # only figures of the study folder
        for p in sorted(study.glob(pattern)) if inside else []:
            if p.is_file():
                rel = p.relative_to(study).as_posix()
                out.append({"src": w.copy(p, rel), "caption": caption, "name": p.stem})
    return out


def _names_model(figure: str, model: str) -> bool:
    """Whether a figure's file name holds the model id as a whole '_'-separated part
    (faithfulness_<model>_<domain>): it then belongs on that model's page."""
    return re.search(rf"(^|_){re.escape(model)}(_|$)", figure) is not None


def _cka(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """CKA per analysis point for every domain pair (the C2 subset and linear kernel when present)."""
    subsets = R.get(result, "results")
    if not isinstance(subsets, Mapping) or not subsets:
        return None
    subset = "C2" if "C2" in subsets else next(iter(subsets))
    kernels = subsets[subset] if isinstance(subsets[subset], Mapping) else {}
    kernel = "linear" if "linear" in kernels else next(iter(kernels), None)
    pairs = []
    for pair, v in (kernels.get(kernel) or {}).items():
        a, _, b = str(pair).partition("|")
        pairs.append({"a": a, "b": b, "cka": [R.number(x) for x in R.get(v, "cka") or []],
                      "ci_low": [R.number(x) for x in R.get(v, "ci_low") or []],
                      "ci_high": [R.number(x) for x in R.get(v, "ci_high") or []]})
    return {"points": [str(p) for p in R.get(result, "points") or []], "subset": subset, "kernel": kernel,
            "pairs": pairs} if pairs else None


def _explanations(model: str, path: Path, w: _Writer) -> str:
    """The model's node explanations as one data file, their images copied in; returns its path."""
    ex = read_explanations(path)
    nodes, n_img = {}, 0

    def image(p: Path | None) -> str | None:
        nonlocal n_img
        if p is None or not p.is_file():
            return None
        n_img += 1
        return w.copy(p, f"img/{slug(model)}/{n_img}{p.suffix}")

    for name, e in ex.nodes.items():
        nodes[name] = {k: getattr(e, k) for k in ("method", "explained", "chance", "ceiling", "norm", "ig_score",
                                                  "skipped")}
        nodes[name] |= {"labels": [vars(lb) for lb in e.labels], "domains": {d: vars(v) for d, v in e.domains.items()},
                        "examples": {d: [{"image": image(x.thumbnail), "activation": x.activation, "class": x.class_name}
                                         for x in xs] for d, xs in e.examples.items()}}
    return w.data(f"data/explain/{slug(model)}.js", {"nodes": nodes, "skipped": ex.skipped})


def _model_page(model: str, rows: Sequence[Mapping[str, Any]], measures: Sequence[str], cka: Mapping | None,
                circuits: Sequence[L.CircuitRef], class_order: Sequence[str], figures: Sequence[Mapping[str, str]],
                explain: Path | None, w: _Writer) -> str:
    """One model's data file (and its circuit and explanation files); returns its path. Classes are
    listed in the study's order (`class_order`), others after."""
    rank = {c: i for i, c in enumerate(class_order)}
    classes = sorted(dict.fromkeys(c.class_name for c in circuits), key=lambda c: (rank.get(c, len(rank)), c))
    domains = list(dict.fromkeys(c.domain for c in circuits))
    files, counts = {}, {}
    for cls in classes:
        per = {c.domain: L.read_circuit(c.path) for c in circuits if c.class_name == cls}
        counts[cls] = {d: sum(len(v) for v in circ["nodes"].values()) for d, circ in per.items()}
        files[cls] = w.data(f"data/circuit/{slug(model)}/{slug(cls)}.js", {"class": cls, "domains": per})
    mine = [f for f in figures if _names_model(f["name"], model)]
    page = {"model_id": model, "rows": [R.model_detail(r, measures) for r in rows], "cka": _cka(cka),
            "circuits": {"classes": classes, "domains": domains, "files": files, "counts": counts},
            "figures": mine, "explanations": _explanations(model, explain, w) if explain else None}
    return w.data(f"data/model/{slug(model)}.js", page)


def _write_site(study: Path, results: Mapping[str, Any], root: Path, analysis: bool) -> tuple[int, int, int]:
    """Every page's data and the assets into `root`; (models, circuits, models with explanations).
    `analysis`: `study` is one run's analysis folder, `results` its one placeholder row."""
    w = _Writer(root)
    for asset in sorted(ASSETS.iterdir()):
        if asset.is_file():
            w.copy(asset, asset.name if asset.suffix == ".html" else f"assets/{asset.name}")
    rows = R.model_rows(results)
    measures = R.measures_of(rows)
    if analysis:
        run = R.model_id(rows[0])
        cka, circuits = {run: L.analysis_cka(study)}, L.analysis_circuits(study, run)
    else:
        by_ckpt = L.checkpoints(study, rows)
        cka = L.cka_results(study, by_ckpt)
        circuits = L.circuit_refs(study, results, by_ckpt)
    explain = find_explanations(study, {R.model_id(r) for r in rows})
    figures = _figures(study, results, w)
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(R.model_id(r), []).append(r)
    order = R.circuit_class_names(results)
    pages = {m: _model_page(m, rs, measures, cka.get(m), [c for c in circuits if c.model_id == m], order, figures,
                            explain.get(m), w) for m, rs in by_model.items()}
    per_model = {f["src"] for f in figures if any(_names_model(f["name"], m) for m in by_model)}
    report = study / L.REPORT
    w.data("data/study.js", {
        "title": "clipmech analysis" if analysis else "clipmech study", "folder": study.resolve().name,
        "kind": "analysis" if analysis else "study", "schema_version": results.get("schema_version"),
        "config": R.config(results), "findings": R.findings(results),
        "accuracy": R.accuracy_table(results, report.read_text() if report.is_file() else None),
        "measures": measures, "models": [R.model_summary(r, measures) | {"page": pages[R.model_id(r)]} for r in rows],
        "unnamed_rows": R.unnamed_rows(results),
        "figures": [f for f in figures if f["src"] not in per_model]})
    return len(pages), len(circuits), len(explain)


def _swap_in(built: Path, dest: Path) -> None:
    """Replace `dest` by `built` with renames (the old site is removed only after the new one is in place)."""
    old = None
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise ViewInputError(f"{dest} exists and is not a folder; move it away so `clipmech view` can write "
                                 "the site there")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
        os.rename(dest, old / dest.name)
    os.rename(built, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_site(study_dir: str | Path) -> Site:
    """Write the static site of the study in `study_dir` to `study_dir`/view (replacing an older one).

    Reads results.json, report.md, figures/, the registry's CKA and circuit entries, analysis units
    and explanations.json files; computes nothing. Raises ViewInputError (one line) when the folder
    is not a study. Cost: reading those files and copying the figures (seconds for the quickstart).
    """
    t0 = time.perf_counter()
    study = Path(study_dir)
    if not study.is_dir():
        raise ViewInputError(f"{study} is not a folder; `clipmech view` {NEEDS}")
    analysis = not L.is_study(study) and L.is_analysis(study)
    if not L.is_study(study) and not analysis:
        raise ViewInputError(f"{study} holds no {L.RESULTS} and no analysis files; `clipmech view` {NEEDS}")
    results = {"models": [{"model_id": L.analysis_model_id(study)}]} if analysis else L.read_json(study / L.RESULTS)
    if not R.has_rows(results):
        raise ViewInputError(f"{study / L.RESULTS} has no list of model rows ('models'); `clipmech view` {NEEDS}")
    built = Path(tempfile.mkdtemp(prefix=f".{SITE_FOLDER}-build-", dir=study))
    built.chmod(0o755)  # mkdtemp makes it private; the site is meant to be shared
    try:
        models, circuits, explained = _write_site(study, results, built, analysis)
        size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
        _swap_in(built, study / SITE_FOLDER)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return Site(study / SITE_FOLDER / "index.html", models, circuits, explained, size, time.perf_counter() - t0)
