"""The study's figures: pure functions from plain dicts / arrays to a PNG file.

Every function takes already-computed numbers (no models, no datasets), draws one figure with
labelled axes and units in a colour-blind-safe palette (Okabe & Ito 2008 for categories, viridis /
cividis for heatmaps), writes it atomically and returns the path. That keeps the figures testable
without training anything and lets `experiments/` redraw them from stored results.

We build `matplotlib.figure.Figure` objects directly instead of going through pyplot: no global
state, no GUI backend, safe to call from any thread.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from clipmech.utils import PathLike, atomic_write_bytes

# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

# Paper naming of the four main setups (Fig. 1 / Fig. 2 order) and their display labels.
SETUP_LABELS = {
    "natural_only": "natural-only",
    "lod": "leave-out-domain (DG)",
    "cg_low": "CG low-diversity",
    "cg_high": "CG high-diversity",
    "pseudo_low": "pseudo upper bound (low)",
    "pseudo_high": "pseudo upper bound (high)",
}


def _save(fig: Figure, path: PathLike, dpi: int = 130) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(buf.getvalue(), path)


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or inf values {arr.tolist()}; "
                         "drop the failed runs before plotting")
    return arr


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval) over seeds; half-width 0 for n = 1."""
    arr = _finite(values, "values")
    if arr.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if arr.size == 1:
        return float(arr[0]), 0.0
    half = stats.t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return float(arr.mean()), float(half)


def grouped_bars(acc: Mapping[str, Mapping[str, Sequence[float]]], path: PathLike,
                 ylabel: str = "C2 top-1 accuracy, class-balanced (%)",
                 title: str = "Generalization to the test domain's held-out classes",
                 ci: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> Path:
    """Figure-2-style bars: `acc[setup][test_domain]` = per-seed accuracies in [0, 1].

    One group per test domain, one bar per setup (in the mapping's order), height = mean over seeds,
    error bar = `ci[setup][test_domain]` (low, high) in [0, 1] when given (e.g. a bootstrap over seeds
    and classes), else the 95% t-interval over seeds (none for one seed); seeds are drawn as dots.
    """
    setups = list(acc)
    if not setups:
        raise ValueError("grouped_bars: no setups given")
    domains = sorted({d for s in setups for d in acc[s]})
    width = 0.8 / len(setups)
    fig = Figure(figsize=(max(5.0, 1.2 * len(domains) * len(setups) * 0.45 + 2), 3.8))
    ax = fig.subplots()
    for i, setup in enumerate(setups):
        for j, dom in enumerate(domains):
            seeds = acc[setup].get(dom)
            if seeds is None or len(seeds) == 0:
                continue
            vals = 100 * _finite(seeds, f"accuracies of {setup}/{dom}")
            mean, half = mean_ci(vals)
            yerr = half if len(vals) > 1 else None
            if ci is not None and dom in ci.get(setup, {}):
                low, high = (100 * v for v in ci[setup][dom])
                yerr = [[max(mean - low, 0.0)], [max(high - mean, 0.0)]]
            x = j + (i - (len(setups) - 1) / 2) * width
            ax.bar(x, mean, width * 0.92, color=OKABE_ITO[i % len(OKABE_ITO)], yerr=yerr, capsize=3,
                   label=SETUP_LABELS.get(setup, setup) if j == 0 else None)
            ax.scatter(np.full(len(vals), x), vals, s=9, color="black", zorder=3)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_xlabel("test domain")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def accuracy_over_epochs(curves: Mapping[str, Sequence[Sequence[float]]], path: PathLike,
                         ylabel: str = "C2 top-1 accuracy, class-balanced (%)",
                         title: str = "Accuracy during training", epochs: Sequence[int] | None = None) -> Path:
    """Lines of accuracy (in [0, 1]) against epoch: `curves[label]` = [n_seeds][n_points] values at
    `epochs` (default 0, 1, 2, ...).

    Draws the mean over seeds with a min-max band; epoch 0 is the untrained model.
    """
    if not curves:
        raise ValueError("accuracy_over_epochs: no curves given")
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    for i, (label, per_seed) in enumerate(curves.items()):
        arr = 100 * np.atleast_2d(_finite(per_seed, f"curve {label!r}"))
        x = np.arange(arr.shape[1]) if epochs is None else np.asarray(epochs)
        if len(x) != arr.shape[1]:
            raise ValueError(f"curve {label!r} has {arr.shape[1]} points but {len(x)} epochs were given")
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(x, arr.mean(0), color=colour, marker=MARKERS[i % len(MARKERS)], ms=3,
                label=SETUP_LABELS.get(label, label))
        if arr.shape[0] > 1:
            ax.fill_between(x, arr.min(0), arr.max(0), color=colour, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def cka_per_layer(cka: Mapping[tuple[str, str], Sequence[float]], layers: Sequence[str],
                  test_domain: str, path: PathLike,
                  title: str = "Domain similarity of class centroids per layer") -> Path:
    """CKA (unitless, in [0, 1] up to estimator noise) per analysis point for each domain pair.

    `cka[(a, b)]` = one value per entry of `layers`. Pairs containing `test_domain` are drawn in
    colour, all other pairs in thin grey, so "is the test domain less shared?" reads at a glance.
    """
    if not cka:
        raise ValueError("cka_per_layer: no domain pairs given")
    fig = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.0))
    ax = fig.subplots()
    x = np.arange(len(layers))
    colour_i = 0
    grey_labelled = False
    for (a, b), vals in sorted(cka.items()):
        vals = _finite(vals, f"CKA of pair {a}-{b}")
        if vals.shape != (len(layers),):
            raise ValueError(f"CKA of pair {a}-{b} has {vals.size} values but there are "
                             f"{len(layers)} layers")
        if test_domain in (a, b):
            other = b if a == test_domain else a
            ax.plot(x, vals, color=OKABE_ITO[colour_i % len(OKABE_ITO)], lw=2,
                    marker=MARKERS[colour_i % len(MARKERS)], ms=4, label=f"{test_domain}-{other}")
            colour_i += 1
        else:
            ax.plot(x, vals, color="0.6", lw=0.8, alpha=0.7,
                    label=None if grey_labelled else "pairs without the test domain")
            grey_labelled = True
    ax.set_xticks(x, [_short_layer(n) for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("analysis point (input side → embedding)")
    ax.set_ylabel("linear CKA (unbiased, class centroids)")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _short_layer(name: str) -> str:
    """'visual.layer2.0.hook_out' -> 'layer2.0'; keeps tick labels readable."""
    return name.removeprefix("visual.").replace(".hook_out", "").replace("hook_", "")


def _heatmap(ax, matrix: np.ndarray, labels: Sequence[str], title: str, cbar_label: str,
             vmin: float = 0.0, vmax: float = 1.0) -> None:
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"{title}: matrix shape {matrix.shape} does not match {len(labels)} labels")
    im = ax.imshow(matrix, cmap="cividis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("domain")
    ax.set_ylabel("domain")
    ax.set_title(title, fontsize=10)
    for i in range(len(labels)):
        for j in range(len(labels)):
            v = matrix[i, j]
            # Text colour flips on the bright half of cividis for contrast.
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if (v - vmin) / max(vmax - vmin, 1e-12) > 0.6 else "white")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=cbar_label)


def jaccard_heatmaps(node: np.ndarray, edge: np.ndarray, domains: Sequence[str], path: PathLike,
                     title: str = "Circuit overlap between domains") -> Path:
    """Two [D, D] heatmaps side by side: node and edge Jaccard (unitless, 0-1) of per-class circuits."""
    node = _finite(node, "node Jaccard")
    edge = _finite(edge, "edge Jaccard")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    _heatmap(axes[0], node, domains, "node Jaccard (top-10% nodes per layer)", "Jaccard index")
    _heatmap(axes[1], edge, domains, "edge Jaccard (top-3 incoming edges)", "Jaccard index")
    fig.suptitle(title)
    return _save(fig, path)


def feature_sharing_matrix(matrix: np.ndarray, domains: Sequence[str], path: PathLike,
                           title: str = "SAE feature sharing on C2 classes") -> Path:
    """[D, D] heatmap of the paper's Alg. 2 sharing score (mean top-K overlap, unitless, 0-1)."""
    fig = Figure(figsize=(6, 4.8), layout="constrained")
    _heatmap(fig.subplots(), _finite(matrix, "feature sharing"), domains, title,
             "shared top-K SAE latents (fraction)")
    return _save(fig, path)


def umap_by_domain(coords: np.ndarray, domain_idx: Sequence[int], domains: Sequence[str],
                   path: PathLike, title: str = "Image embeddings (UMAP) coloured by domain") -> Path:
    """Scatter of a 2-D embedding `coords` [N, 2], one colour and marker per domain."""
    coords = _finite(coords, "UMAP coordinates")
    domain_idx = np.asarray(domain_idx)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(domain_idx) != len(coords):
        raise ValueError(f"umap_by_domain needs coords [N, 2] and N domain indices; got "
                         f"{coords.shape} and {len(domain_idx)}")
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for d, name in enumerate(domains):
        pts = coords[domain_idx == d]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.75, color=OKABE_ITO[d % len(OKABE_ITO)],
                   marker=MARKERS[d % len(MARKERS)], label=name, lw=0)
    ax.set_xlabel("UMAP 1 (arbitrary units)")
    ax.set_ylabel("UMAP 2 (arbitrary units)")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=2)
    return _save(fig, path)


def sharedness_scatter(points: Mapping[str, Sequence[tuple[float, float, str]]],
                       correlations: Mapping[str, Mapping[str, float | None]], path: PathLike,
                       title: str = "Does sharedness go with compositional generalization?") -> Path:
    """One panel per sharedness measure: x = measure, y = C2 accuracy (in [0, 1]) of each model.

    `points[measure]` = [(sharedness, c2_acc, setup), ...]; `correlations[measure]` = {"rho",
    "ci_low", "ci_high", "n"} (within-domain Spearman averaged over test domains, see
    `clipmech.study.stats.correlation`), shown in the panel title.
    """
    measures = list(points)
    if not measures:
        raise ValueError("sharedness_scatter: no measures given")
    fig = Figure(figsize=(4.0 * len(measures) + 1.5, 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures), sharey=True))
    setups = list(dict.fromkeys(s for m in measures for _, _, s in points[m]))
    for ax, measure in zip(axes, measures):
        for i, setup in enumerate(setups):
            pts = np.array([(x, y) for x, y, s in points[measure] if s == setup], dtype=float)
            if pts.size == 0:
                continue
            ax.scatter(pts[:, 0], 100 * pts[:, 1], color=OKABE_ITO[i % len(OKABE_ITO)],
                       marker=MARKERS[i % len(MARKERS)], s=30, label=SETUP_LABELS.get(setup, setup))
        c = correlations.get(measure, {})
        if c.get("rho") is None:
            subtitle = "Spearman ρ: n/a\n" + textwrap.shorten(c.get("reason", "no data"), 48)
        else:
            ci = "no CI" if c.get("ci_low") is None else f"95% CI [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
            subtitle = f"Spearman ρ = {c['rho']:.2f}, n = {c['n']}\n{ci}"
        ax.set_title(subtitle, fontsize=8)
        ax.set_xlabel(f"{measure} (unitless)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("C2 top-1 accuracy, class-balanced (%)")
    axes[-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    return _save(fig, path)


def node_explanations(nodes: Sequence[Mapping], thumbnails: Mapping[str, Mapping[str, np.ndarray]],
                      domains: Sequence[str], path: PathLike, title: str = "") -> Path:
    """One row per node: its name, its labels with the fraction of its effect each explains (chance
    and ceiling beside them), then per domain its top example (uint8 [S, S, 3], overlaid by the
    node's activation map) with the node's mean activation / ablation effect there. `nodes` are
    entries of explanations.json (docs/explain.md); `thumbnails[node][domain]` the pictures."""
    if not nodes:
        raise ValueError("no nodes to draw; explain some first (clipmech analyze explain)")
    cols = 1 + len(domains)
    fig = Figure(figsize=(2.6 + 1.25 * len(domains), 1.35 * len(nodes) + 0.5))
    axes = fig.subplots(len(nodes), cols, squeeze=False, gridspec_kw={"width_ratios": [2.4] + [1] * len(domains)})
    for r, node in enumerate(nodes):
        text = [_short_layer(node["point"]) + f"/{node['index']}"]
        text += [f"{x['word'][:18]}: {x['fraction']:.0%}" for x in node["labels"]]
        text.append(f"chance {node['chance']:.0%}, ceiling {node['ceiling']:.0%}")
        axes[r, 0].text(0, 0.5, "\n".join(text), va="center", fontsize=7, family="monospace")
        axes[r, 0].axis("off")
        for c, d in enumerate(domains, start=1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = thumbnails.get(node["node"], {}).get(d)
            if img is not None:
                ax.imshow(img)
            stats_d = node["domains"].get(d)
            if stats_d is not None:
                ax.set_xlabel(f"act {stats_d['mean_activation']:.2g}\nabl {stats_d['ablation_effect']:+.2g}", fontsize=6)
            if r == 0:
                ax.set_title(d, fontsize=8)
    fig.suptitle(title or "circuit nodes: labels (share of the node's effect explained) and top examples", fontsize=9)
    return _save(fig, path)
