"""Per-(domain, class) image samples for the paper's circuit analysis (docs/methods.md#circuits).

The paper draws each (domain, class) batch from ONE shuffle of the whole test split seeded 42: the
first n images of that cell in the shuffled order. A cell's sample therefore does not depend on which
domains or classes are analysed, and a smaller n gives a prefix of a larger one. The shuffle is
numpy's `default_rng(seed).permutation` (the paper's own shuffle routine is not documented, so exact
image ids may differ from the paper's; the rule is the same).
"""
from __future__ import annotations

import hashlib

import numpy as np

from clipmech.data.dataset import DomainDataset


def cell_samples(dataset: DomainDataset, n: int = 50, split: str | None = "test",
                 seed: int = 42) -> dict[tuple[str, str], np.ndarray]:
    """{(domain, class name): int64 sample indices} — up to `n` per cell, in shuffled order, from
    one permutation of `split` (None: all samples) seeded `seed`. Cells without samples are absent.
    Cost: one permutation and one stable sort of the split, O(N log N)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 images per (domain, class), got {n}")
    shuffled = np.random.default_rng(seed).permutation(dataset.indices(split=split))
    cell = dataset.domain_idx[shuffled] * len(dataset.classes) + dataset.class_idx[shuffled]
    order = np.argsort(cell, kind="stable")  # cells contiguous, shuffled order kept inside each
    cell_sorted = cell[order]
    starts = np.searchsorted(cell_sorted, cell_sorted, side="left")
    take = np.arange(len(order)) - starts < n
    first, keys = order[take], cell_sorted[take]  # grouped by cell, shuffled order inside each
    bounds = np.flatnonzero(np.diff(keys)) + 1
    out: dict[tuple[str, str], np.ndarray] = {}
    for group in np.split(np.arange(len(first)), bounds) if len(first) else []:
        d, k = divmod(int(keys[group[0]]), len(dataset.classes))
        out[(dataset.domains[d], dataset.classes[k])] = shuffled[first[group]].astype(np.int64)
    return out


def capped_rows(rows: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """`rows` itself when `n` is None or there are at most `n`, else `n` of them: the first n of a
    permutation seeded `seed`, in ascending order. The mean-ablation references use it so a domain
    of DomainNet's size is not decoded whole. Cost: one permutation of `rows`."""
    rows = np.asarray(rows)
    if n is None or len(rows) <= n:
        return rows
    if n < 1:
        raise ValueError(f"a reference needs at least 1 image, got n = {n}")
    return np.sort(np.random.default_rng(seed).permutation(rows)[:n])


def distinct_drawings(dataset) -> np.ndarray:
    """Bool per sample of `dataset`: a distinct drawing. A dataset that marks augmented views
    (`view_idx`, the emoji domains) counts only view 0, so views of one drawing never count twice;
    any other dataset counts every sample."""
    views = getattr(dataset, "view_idx", None)
    return np.ones(len(dataset.class_idx), bool) if views is None else np.asarray(views) == 0


def drawing_keys(dataset, rows) -> list[set[tuple]]:
    """Per dataset row, the keys under which two rows are the same drawing: its style
    ("style", class, style index) where the dataset marks styles (emoji: every augmented view of a
    drawing shares it), its source ("source", path) where images are files, and its pixels
    ("pixels", sha1) where they are in memory (an identical image stored twice). Cost: hashing the
    in-memory images of `rows`."""
    styles = getattr(dataset, "style_idx", None)
    out = []
    for i in np.asarray(rows, dtype=np.int64).tolist():
        keys = set()
        if styles is not None:
            keys.add(("style", int(dataset.class_idx[i]), int(styles[i])))
        if dataset.sources is not None:
            keys.add(("source", dataset.source_key(i)))
        elif dataset.images is not None:
            keys.add(("pixels", hashlib.sha1(np.ascontiguousarray(dataset.images[i]).tobytes()).hexdigest()))
        out.append(keys)
    return out


def check_disjoint_drawings(dataset, discovery_rows, ablation_rows, what: str = "causal test") -> None:
    """Raise ValueError when a drawing (`drawing_keys`: same style and class, same source file or
    same pixels) is among both the discovery and the ablation rows of `dataset`: a circuit found on
    a drawing must not be tested on another view or copy of it. The message names the leaked rows."""
    seen: dict[tuple, int] = {}
    for i, keys in zip(np.asarray(discovery_rows).tolist(), drawing_keys(dataset, discovery_rows)):
        for key in keys:
            seen.setdefault(key, i)
    leaks = [(seen[key], j, key) for j, keys in zip(np.asarray(ablation_rows).tolist(), drawing_keys(dataset, ablation_rows))
             for key in keys if key in seen]
    if leaks:
        shown = "; ".join(f"row {a} and row {b} share {k[0]} {k[1:]}" for a, b, k in leaks[:3])
        raise ValueError(f"{what}: {len({b for _, b, _ in leaks})} ablation drawing(s) also used for discovery ({shown}); discover on "
                         "other drawings (other styles or files) than those ablated")


# ------------------------------------------------------------------ causal test: discovery vs held out
DISCOVERY = {"train": ("distinct training-split drawings", "the test-split drawings"),
             "split": ("a seeded half of each (domain, class) cell's test images", "the other half")}


def discovery_mode(dataset, choice: str) -> str:
    """--discovery resolved: 'auto' is 'train' for a dataset of augmented drawings (it marks views,
    `view_idx`: emoji, whose test split holds one drawing per cell), else 'split'."""
    if choice != "auto":
        return choice
    return "train" if getattr(dataset, "view_idx", None) is not None else "split"


def causal_cells(dataset, domains: list[str], classes: list[str], mode: str, n_max: int, seed: int
                 ) -> tuple[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], list[str]]:
    """{(domain, class): (discovery rows, held-out rows)} of `dataset`, disjoint, and the skipped cells.

    Distinct drawings only (views other than 0 never count). mode 'train': discovery = up to `n_max`
    training-split drawings, held out = the cell's test drawings; 'split': the cell's test images
    shuffled (seeded per cell by `seed`, domain and class, so a cell's split does not depend on what
    else is analysed), discovery = the first ceil(n/2) (at most `n_max`), held out = the other
    floor(n/2); cells with < 2 test images are skipped. Cells without discovery rows are skipped."""
    distinct = distinct_drawings(dataset)
    cells, skipped = {}, []
    for d in domains:
        for k in classes:
            rng = np.random.default_rng([seed, dataset.domains.index(d), dataset.classes.index(k)])
            test, train = (idx[distinct[idx]] for idx in (dataset.indices(split=s, domains=[d], classes=[k])
                                                         for s in ("test", "train")))
            if mode == "train":
                disc, held = rng.permutation(train)[:n_max], test
            elif len(test) < 2:
                disc = held = test[:0]
            else:
                perm = rng.permutation(test)
                disc, held = perm[: len(perm) - len(perm) // 2][:n_max], perm[len(perm) - len(perm) // 2:]
            if len(disc):
                cells[d, k] = (np.sort(disc), np.sort(held))
            else:
                skipped.append(f"{d}/{k}")
    return cells, skipped
