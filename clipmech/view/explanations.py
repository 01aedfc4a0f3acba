"""Reading per-node explanations (what a circuit node carries) for the node pages.

`clipmech analyze explain` writes `explain_<label>/explanations.json` (format
`clipmech.explanations/1`, described in docs/explain.md): per node ("<analysis point>/<index>", the
circuits' node names) its labels (a vocabulary word, the fraction of the node's effect energy it
explains, its logit effect), the explained total beside chance and ceiling, per domain the mean
activation and the mean-ablation effect on the true-class logit, and the top examples per domain
as thumbnails (the input with the node's activation map on top), paths relative to the file.

Every field is optional here: a record keeps what it has, a node without labels keeps its
`skipped` reason, an entry that is not a record naming a node is skipped and counted, never
guessed. Where no file exists the node page shows the node's circuit scores instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from clipmech.view import results as R
from clipmech.view.locate import RUN_FOLDER, read_json

FILE_NAME = "explanations.json"
FORMAT = "clipmech.explanations/1"
_PRUNE = {"cache", "shards", "circuit_files", "sae_files", "view"}  # large folders without explanations


@dataclass(frozen=True)
class Label:
    word: str
    fraction: float | None = None  # share of the node's effect energy this label explains
    logit_effect: float | None = None  # mean change of the image-word cosine the node makes


@dataclass(frozen=True)
class Example:
    thumbnail: Path | None  # absolute, or None when the record names none
    activation: float | None = None
    class_name: str | None = None


@dataclass(frozen=True)
class DomainSummary:
    mean_activation: float | None = None
    ablation_effect: float | None = None  # mean change of the true-class logit under mean ablation
    n_images: int | None = None


@dataclass(frozen=True)
class NodeExplanation:
    node: str
    method: str | None = None
    labels: list[Label] = field(default_factory=list)
    explained: float | None = None
    chance: float | None = None
    ceiling: float | None = None
    norm: float | None = None
    ig_score: float | None = None
    skipped: str | None = None
    domains: dict[str, DomainSummary] = field(default_factory=dict)
    examples: dict[str, list[Example]] = field(default_factory=dict)


@dataclass
class Explanations:
    """The readable records of one file; `skipped` counts the entries that were not; `names`: what
    the file says about its model (a model id, its run folder's name)."""

    names: list[str]
    nodes: dict[str, NodeExplanation]
    skipped: int = 0


def _items(value: Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in value.items()] if isinstance(value, Mapping) else []


def read_record(rec: Mapping[str, Any], base: Path) -> NodeExplanation | None:
    """One node's record (see the module note), thumbnails resolved against `base`; None when it
    names no node."""
    node = rec.get("node")
    if not isinstance(node, str) or "/" not in node:
        return None
    labels = [Label(str(lb["word"]), R.number(lb.get("fraction")), R.number(lb.get("logit_effect")))
              for lb in (rec.get("labels") if isinstance(rec.get("labels"), list) else [])
              if isinstance(lb, Mapping) and lb.get("word")]
    domains = {d: DomainSummary(R.number(v.get("mean_activation")), R.number(v.get("ablation_effect")),
                                v.get("n_images") if isinstance(v.get("n_images"), int) else None)
               for d, v in _items(rec.get("domains")) if isinstance(v, Mapping)}
    examples = {d: [Example(base / x["thumbnail"] if isinstance(x.get("thumbnail"), str) else None,
                            R.number(x.get("activation")), x.get("class") if isinstance(x.get("class"), str) else None)
                    for x in xs if isinstance(x, Mapping)]
                for d, xs in _items(rec.get("top_examples")) if isinstance(xs, list)}
    text = (lambda k: rec[k] if isinstance(rec.get(k), str) else None)
    return NodeExplanation(node, text("method"), labels, R.number(rec.get("explained")), R.number(rec.get("chance")),
                           R.number(rec.get("ceiling")), R.number(rec.get("norm")), R.number(rec.get("ig_score")),
                           text("skipped"), domains, examples)


def read_explanations(path: str | Path) -> Explanations:
    """Every readable node record of an explanations file (see the module note). Raises ValueError
    naming the file when it is not JSON or of another format."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, Mapping) or data.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file; write it with `clipmech analyze explain`")
    records = data.get("nodes")
    records = list(records.values()) if isinstance(records, Mapping) else records if isinstance(records, list) else []
    nodes, skipped = {}, 0
    for rec in records:
        parsed = read_record(rec, path.parent) if isinstance(rec, Mapping) else None
        if parsed is None:
            skipped += 1
        else:
            nodes[parsed.node] = parsed
    names = [str(v) for v in (data.get("model_id"), R.get(data, "meta", "model_id")) if v]
    run_dir = R.get(data, "meta", "run_dir")
    if isinstance(run_dir, str) and run_dir:
        names.append(Path(run_dir).name)
    return Explanations(names, nodes, skipped)


def _run_model(folder: str) -> str | None:
    m = RUN_FOLDER.match(folder)
    return m.group("model") if m else None


def find_explanations(study: Path, model_ids: set[str]) -> dict[str, Path]:
    """{model id: explanations file} under `study`: a file names its model by "model_id", by its
    meta's run_dir, or by a folder on its path, each either the model id or its run folder's name
    (`<model id>-<8 hex>`)."""
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(study):
        dirs[:] = sorted(d for d in dirs if d not in _PRUNE)
        if FILE_NAME in files:
            p = Path(root) / FILE_NAME
            try:
                names = read_explanations(p).names
            except (OSError, ValueError):
                continue
            parts = names + list(reversed(p.relative_to(study).parts))
            named = next((m for part in parts for m in (part, _run_model(part)) if m in model_ids), None)
            if named:
                out.setdefault(named, p)
    return out
