"""Per-(domain, class) circuits of one model on one drawing selection, computed once per registry.

`study` below is a clipmech.study.plan.RunAnalysis (the model's Source, Preset, registry and images).

The circuit stage's score, the controls' ceilings (a second, disjoint drawing set), the untrained
floor, the causal test and the faithfulness curves all need circuits of the same cells; a circuit
set is therefore identified by (model, split, rows per cell, analysis options) and stored once:
the registry keeps the index (JSON), the circuits themselves (they carry node-score tensors) are
`Circuit.save` files in `<registry>/circuit_files/<key hash>/`. A model shared by several study rows
(natural-only on two test domains; untrained checkpoints, identical across setups of one seed) is
analysed once.

Drawing selection (`circuit_cells`): the test drawings of a cell are the paper's sample (up to 50
per (domain, class) from one permutation seeded 42, `clipmech.data.samples.cell_samples`); the
"repeat" drawings are as many distinct training drawings of the same cell (emoji: view 0 only, so
augmented views never count twice). A cell with fewer distinct training drawings than test ones
has no repeat set (empty rows: skipped, and counted by the controls).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from clipmech.analysis.ablation import ablation_values
from clipmech.analysis.circuit import Circuit, discover_circuits
from clipmech.analysis.discovery import eap_ig_circuit
from clipmech.data.samples import capped_rows, cell_samples, distinct_drawings
from clipmech.utils import hash_obj

Cells = Mapping[str, Mapping[int, np.ndarray]]  # {domain: {class index: rows into study.images(split)}}


def circuit_cells(study) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, dict[int, np.ndarray]]]:
    """(test cells, repeat cells) for the study's circuit classes (the first `circuit_classes` C2
    classes): test rows into study.images("test") from `cell_samples(n=50, seed 42)`, repeat rows
    into study.images("train"): the first distinct training drawings of the cell, as many as test
    rows, or none when the cell has fewer."""
    ds = study.dataset
    test, train = ds.indices(split="test"), ds.indices(split="train")
    distinct = distinct_drawings(ds)[train]
    samples = cell_samples(ds, n=50, split="test", seed=42)  # docs/methods.md#circuits: one seeded shuffle, 50 per cell
    classes = [ds.classes.index(c) for c in study.c2][: study.opts.circuit_classes]
    test_cells: dict[str, dict[int, np.ndarray]] = {d: {} for d in ds.domains}
    repeat_cells: dict[str, dict[int, np.ndarray]] = {d: {} for d in ds.domains}
    for di, d in enumerate(ds.domains):
        for k in classes:
            rows = np.searchsorted(test, samples.get((d, ds.classes[k]), np.zeros(0, np.int64)))
            if not len(rows):
                continue
            test_cells[d][k] = rows
            own = np.flatnonzero((ds.domain_idx[train] == di) & (ds.class_idx[train] == k) & distinct)[: len(rows)]
            repeat_cells[d][k] = own if len(own) == len(rows) else own[:0]
    return test_cells, repeat_cells


def cell_circuits(study, model, model_key: str, cells: Cells, split: str) -> tuple[dict[str, dict[int, Circuit]], bool]:
    """({domain: {class: Circuit}}, reused): every domain of `cells`, a circuit for each cell with
    rows; meta {"split", "rows", "class" (name), "domain"} (what `clipmech view` labels them by).

    `model_key` identifies the weights (a checkpoint hash). Cost on a miss: `discover_circuits` over
    the cells (the node IGs of all cells batched, one edge IG per cell and consecutive pair,
    `study.opts.circuit_steps` steps), or with `circuit_method` "eap_ig" one `eap_ig_circuit` per
    cell; on a hit: loading the circuit files.
    """
    key = {"stage": "circuit_set", "model": model_key, "dataset": study.dataset.content_hash(), "split": split,
           "rows": {d: {str(k): np.asarray(r).tolist() for k, r in per.items() if len(r)} for d, per in cells.items()},
           **study.opts.analysis_key()}
    folder = study.registry.root / "circuit_files" / hash_obj(key)

    def compute() -> dict[str, dict[str, str]]:
        images = study.images(split)
        head = study.source.head(model)
        todo = [(di, d, k, rows) for di, (d, per) in enumerate(cells.items()) for k, rows in per.items() if len(rows)]
        batches = [(images[rows], torch.full((len(rows),), k, dtype=torch.long)) for _, _, k, rows in todo]
        metas = [{"split": split, "rows": np.asarray(rows).tolist(), "class": study.dataset.classes[k], "domain": d}
                 for _, d, k, rows in todo]
        if study.opts.circuit_method == "paper_ig":
            found = discover_circuits(model, batches, head, steps=study.opts.circuit_steps, metas=metas)
        else:
            found = _eap_ig_circuits(study, model, split, [d for _, d, _, _ in todo], batches, head, metas)
        index: dict[str, dict[str, str]] = {}
        for (di, d, k, _), c in zip(todo, found):
            index.setdefault(d, {})[str(k)] = c.save(folder / f"{di}_{k}").name
        return index

    index, reused = study.registry.run("circuit_set", key, compute)
    try:
        return _load(folder, index, cells), reused
    except FileNotFoundError:  # the registry entry outlived its circuit files: recompute them
        index = study.registry.put("circuit_set", key, compute())
        return _load(folder, index, cells), False


def _eap_ig_circuits(study, model, split: str, domains: list[str], batches, head, metas) -> list[Circuit]:
    """`eap_ig_circuit` of each batch; the counterfactual is mean ablation over the batch domain's
    images of `split` (as the faithfulness controls' mean ablation), its mean values computed once
    per domain."""
    ds, images = study.dataset, study.images(split)
    domain_idx = ds.domain_idx[ds.indices(split=split)]
    fills: dict[str, tuple] = {}
    out = []
    for d, (x, labels), meta in zip(domains, batches, metas):
        if d not in fills:
            reference = images[capped_rows(np.flatnonzero(domain_idx == ds.domains.index(d)),
                                           study.opts.reference_images)]
            fills[d] = reference, ablation_values(model, reference, model.analysis_points(), "mean")
        reference, fill = fills[d]
        out.append(eap_ig_circuit(model, x, labels, head, reference, steps=study.opts.circuit_steps, fill=fill,
                                  meta=meta))
    return out


def _load(folder, index: Mapping[str, Mapping[str, str]], domains) -> dict[str, dict[int, Circuit]]:
    return {d: {int(k): Circuit.load(folder / name) for k, name in index.get(d, {}).items()} for d in domains}
