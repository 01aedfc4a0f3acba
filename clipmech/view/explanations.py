"""Reading per-node explanations (what a circuit node responds to) for the node pages.

An explanations file (`explanations.json`, written by the look-inside analysis) holds, per node
("<analysis point>/<channel index>", the circuits' node names), a record:

    {"node": "visual.layer3.0.hook_out/17",
     "labels": [{"label": "yellow curved shape", "score": 0.41, "explained": 0.63}, ...],
     "examples": {"<domain>": [{"image": "img/a.png", "heatmap": "img/a_h.png", "activation": 2.1}, ...]},
     "domain_means": {"<domain>": 0.8, ...},
     "ablation": {"effect": -0.12, "ci": [-0.2, -0.05], "metric": "true-class logit"}}

The file is either {"model_id": ..., "nodes": {name: record} | [record, ...]} or a bare list of
records; image paths are relative to the file. Every field is optional: a record keeps what it has,
a malformed entry is skipped and counted, never guessed. Where no file exists the node page shows
the node's circuit scores instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from clipmech.view import results as R
from clipmech.view.locate import RUN_FOLDER, read_json

FILE_NAME = "explanations.json"
_PRUNE = {"cache", "shards", "circuit_files", "sae_files", "view"}  # large folders without explanations


@dataclass(frozen=True)
class Label:
    label: str
    score: float | None = None  # how well the label predicts the node's activation
    explained: float | None = None  # fraction of the node's activation variance the label explains


@dataclass(frozen=True)
class Example:
    image: Path | None  # absolute, or None when the record names none
    heatmap: Path | None = None
    activation: float | None = None


@dataclass(frozen=True)
class NodeExplanation:
    node: str
    labels: list[Label] = field(default_factory=list)
    examples: dict[str, list[Example]] = field(default_factory=dict)
    domain_means: dict[str, float] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None  # {"effect", "ci": [lo, hi], "metric"}


@dataclass
class Explanations:
    """The readable records of one file; `skipped` counts the entries that were not."""

    model_id: str | None
    nodes: dict[str, NodeExplanation]
    skipped: int = 0


def _path(base: Path, value: Any) -> Path | None:
    return (base / value) if isinstance(value, str) and value else None


def read_record(rec: Mapping[str, Any], base: Path, name: str | None = None) -> NodeExplanation | None:
    """One node's record (see the module note), image paths resolved against `base`; None when
    it names no node or its parts have the wrong types."""
    node = rec.get("node", name)
    if not isinstance(node, str) or "/" not in node:
        return None
    labels = [Label(str(lb["label"]), R.number(lb.get("score")), R.number(lb.get("explained")))
              for lb in rec.get("labels") or [] if isinstance(lb, Mapping) and lb.get("label")]
    examples_in = rec.get("examples") or {}
    if not isinstance(examples_in, Mapping) or not isinstance(rec.get("labels") or [], list):
        return None
    examples = {str(d): [Example(_path(base, ex.get("image")), _path(base, ex.get("heatmap")),
                                 R.number(ex.get("activation"))) for ex in exs if isinstance(ex, Mapping)]
                for d, exs in examples_in.items() if isinstance(exs, list)}
    means = {str(d): R.number(v) for d, v in (rec.get("domain_means") or {}).items() if R.number(v) is not None} \
        if isinstance(rec.get("domain_means") or {}, Mapping) else {}
    ab = rec.get("ablation")
    ablation = {"effect": R.number(ab.get("effect")), "ci": [R.number(R.get(ab, "ci", 0)), R.number(R.get(ab, "ci", 1))],
                "metric": str(ab.get("metric") or "")} if isinstance(ab, Mapping) else None
    return NodeExplanation(node, labels, examples, means, ablation)


def read_explanations(path: str | Path) -> Explanations:
    """Every readable node record of an explanations file (see the module note)."""
    path = Path(path)
    data = read_json(path)
    records = data.get("nodes") if isinstance(data, Mapping) else data
    model = R.get(data, "model_id") if isinstance(data, Mapping) else None
    items = list(records.items()) if isinstance(records, Mapping) else [(None, r) for r in records or []] \
        if isinstance(records, list) else []
    nodes, skipped = {}, 0
    for name, rec in items:
        parsed = read_record(rec, path.parent, name) if isinstance(rec, Mapping) else None
        if parsed is None:
            skipped += 1
        else:
            nodes[parsed.node] = parsed
    return Explanations(str(model) if model else None, nodes, skipped)


def _run_model(folder: str) -> str | None:
    m = RUN_FOLDER.match(folder)
    return m.group("model") if m else None


def find_explanations(study: Path, model_ids: set[str]) -> dict[str, Path]:
    """{model id: explanations file} under `study`: a file names its model by "model_id" or by a
    folder on its path named like the model or like its run folder (`<model id>-<8 hex>`)."""
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(study):
        dirs[:] = sorted(d for d in dirs if d not in _PRUNE)
        if FILE_NAME in files:
            p = Path(root) / FILE_NAME
            try:
                model = read_explanations(p).model_id
            except (OSError, ValueError):
                continue
            named = model if model in model_ids else next((m for part in reversed(p.relative_to(study).parts)
                                                           for m in (part, _run_model(part)) if m in model_ids), None)
            if named:
                out.setdefault(named, p)
    return out
