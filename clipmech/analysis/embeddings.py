"""Embedding-space pictures (UMAP) and quantitative domain-separation scores (docs/methods.md#embeddings).

UMAP comes from umap-learn and the scores from scikit-learn; this module only chooses seeded settings,
subsamples reproducibly, and reports scores overall and class-conditionally (the paper had none).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipmech.utils import PathLike, save_figure


def _check(emb: Any, domain_idx: Any, class_idx: Any | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    E = np.asarray(emb.detach().cpu() if hasattr(emb, "detach") else emb, dtype=np.float64)
    d = np.asarray(domain_idx)
    c = None if class_idx is None else np.asarray(class_idx)
    if E.ndim != 2 or len(E) != len(d) or (c is not None and len(c) != len(d)):
        raise ValueError(f"embeddings must be (N, D) with one domain (and class) label per row; got "
                         f"{E.shape}, {len(d)} domain labels" + ("" if c is None else f", {len(c)} class labels"))
    if not np.isfinite(E).all():
        raise ValueError("embeddings contain NaN/inf; check the model outputs")
    return E, d, c


def subsample_per_domain(domain_idx: Any, per_domain: int | None, seed: int = 42) -> np.ndarray:
    """Sorted indices of at most `per_domain` rows per domain, drawn with a seeded generator."""
    d = np.asarray(domain_idx)
    if per_domain is None:
        return np.arange(len(d))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(d == k), size=min(per_domain, int((d == k).sum())), replace=False)
            for k in np.unique(d)]
    return np.sort(np.concatenate(keep))


def umap_2d(emb: Any, seed: int = 42, densmap: bool = True, n_neighbors: int = 15, min_dist: float = 0.1,
            metric: str = "cosine") -> np.ndarray:
    """2-D UMAP (densMAP by default, as in the paper) of (N, D) embeddings, seeded. Returns (N, 2)."""
    import umap

    E = np.asarray(emb, dtype=np.float32)
    if len(E) < 4:
        raise ValueError(f"UMAP needs at least 4 points; got {len(E)}")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(E) - 1), min_dist=min_dist, metric=metric,
                        densmap=densmap, random_state=seed, n_jobs=1)
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            # A seed makes umap run single-threaded and say so on every call; that is the intent here.
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return reducer.fit_transform(E)
    finally:
        # numba resets the process's OpenMP thread count (measured: torch went from 1 to 2 threads under
        # OMP_NUM_THREADS=1), which on a loaded machine made every later stage ~10x more CPU-expensive
        torch.set_num_threads(threads)


def plot_umap(emb: Any, domain_idx: Any, domains: Sequence[str], path: PathLike | None = None,
              exclude: str | None = None, per_domain: int | None = 2000, seed: int = 42, densmap: bool = True,
              title: str = "", ax: Any = None) -> dict:
    """UMAP scatter coloured by domain, drawn into `ax` (a matplotlib Axes) or a new Figure built
    without pyplot (no backend is chosen), written atomically as PNG to `path` when given.

    exclude: a domain name left out *before* fitting (the paper's 'without quickdraw' panel).
    Returns {"path" (None when not written), "n_points", "domains", "excluded", "seed", "densmap"};
    the drawing is `ax` (or `ax.figure`) when you pass one.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    E, d, _ = _check(emb, domain_idx)
    if exclude is not None:
        if exclude not in domains:
            from clipmech.utils import unknown_name_error
            raise unknown_name_error("domain", exclude, domains)
        keep_mask = d != list(domains).index(exclude)
        E, d = E[keep_mask], d[keep_mask]
    idx = subsample_per_domain(d, per_domain, seed)
    xy = umap_2d(E[idx], seed=seed, densmap=densmap)
    if ax is None:
        ax = Figure(figsize=(6, 5), dpi=120).subplots()
    cmap = colormaps["tab10"]
    for k in np.unique(d[idx]):
        m = d[idx] == k
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(int(k) % 10), label=domains[int(k)])
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(title or ("UMAP" + (" (densMAP)" if densmap else "") + (f" without {exclude}" if exclude else "")))
    if path is not None:
        save_figure(ax.figure, path, dpi=120)
    return {"path": None if path is None else str(Path(path)), "n_points": int(len(idx)), "domains": [domains[int(k)] for k in np.unique(d[idx])],
            "excluded": exclude, "seed": seed, "densmap": densmap}


def _scores(E: np.ndarray, d: np.ndarray, folds: int, seed: int) -> dict:
    """Separation scores of labels d on rows E (d must have >= 2 distinct values)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels, counts = np.unique(d, return_counts=True)
    out: dict = {"n": int(len(d))}
    out["silhouette"] = float(silhouette_score(E, d, metric="cosine")) if len(d) > len(labels) else None
    k = int(min(folds, counts.min()))
    if k >= 2:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        out["probe_accuracy"] = float(cross_val_score(clf, E, d, cv=cv).mean())
        out["probe_folds"] = k
    else:
        out["probe_accuracy"], out["probe_folds"] = None, 0
    out["chance"] = float(counts.max() / counts.sum())
    return out


def separation_scores(emb: Any, domain_idx: Any, domains: Sequence[str], class_idx: Any | None = None,
                      folds: int = 5, seed: int = 0, min_per_class_domain: int = 2) -> dict:
    """How separable domains are in an embedding space.

    overall: silhouette by domain (cosine), k-fold cross-validated logistic-regression domain accuracy
    (with the majority-class chance level), and the domain-mean distance matrix (cosine distance between
    mean embeddings). class_conditional (when class_idx is given): the same scores within each class
    (classes with >= 2 domains of >= min_per_class_domain rows), averaged, with the number of classes
    used and skipped; the distance matrix is then the average over classes of class-wise domain-mean
    distances, which removes class-composition differences between domains.
    Cost: dominated by silhouette O(N^2 D) and the probe.
    """
    E, d, c = _check(emb, domain_idx, class_idx)
    if len(np.unique(d)) < 2:
        raise ValueError("separation scores need at least 2 domains in the data")
    out = {"domains": list(domains), "overall": _scores(E, d, folds, seed)}
    out["overall"]["mean_distance"] = _to_list(_mean_distance(E, d, len(domains)))
    if c is None:
        return out
    per, skipped, dists = [], 0, []
    for k in np.unique(c):
        m = c == k
        labels, counts = np.unique(d[m], return_counts=True)
        ok = labels[counts >= min_per_class_domain]
        if len(ok) < 2:
            skipped += 1
            continue
        mm = m & np.isin(d, ok)
        per.append(_scores(E[mm], d[mm], folds, seed))
        dists.append(_mean_distance(E[mm], d[mm], len(domains)))
    if not per:
        out["class_conditional"] = {"n_classes": 0, "skipped_classes": skipped,
                                    "note": f"no class has >= {min_per_class_domain} rows in >= 2 domains"}
        return out
    avg = lambda key: _nanmean([p[key] for p in per])  # noqa: E731
    with warnings.catch_warnings():  # domain pairs that no class has in common stay NaN -> None
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_dist = np.nanmean(np.stack(dists), 0)
    out["class_conditional"] = {"n_classes": len(per), "skipped_classes": skipped, "silhouette": avg("silhouette"),
                                "probe_accuracy": avg("probe_accuracy"), "chance": avg("chance"),
                                "mean_distance": _to_list(mean_dist)}
    return out


def _to_list(A: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in A]


def _nanmean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_distance(E: np.ndarray, d: np.ndarray, n_domains: int) -> np.ndarray:
    """(n_domains, n_domains) cosine distance between domain-mean embeddings; NaN for absent domains."""
    M = np.full((n_domains, E.shape[1]), np.nan)
    for k in np.unique(d):
        M[int(k)] = E[d == k].mean(0)
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    U = M / np.where(norms > 0, norms, 1)
    D = np.clip(1 - U @ U.T, 0.0, 2.0)  # rounding leaves +-1e-16 where the distance is 0
    np.fill_diagonal(D, np.where(np.isnan(np.diag(D)), np.nan, 0.0))
    return D
