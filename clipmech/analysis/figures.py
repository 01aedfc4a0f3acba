"""Figures of one model's circuit analyses (`clipmech analyze circuits|patching` writes them; a
notebook can call them with its own path): a domain x domain (or domain x point) value heatmap, the
causal test's per-class effects, and patching estimates against exact patching.

Every function builds a `matplotlib.figure.Figure` without pyplot, so no backend is chosen or
changed, writes a PNG atomically (`clipmech.utils.save_figure`) and returns the Figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor

from clipmech.analysis.controls import format_estimate
from clipmech.utils import save_figure


def value_heatmap(matrix: np.ndarray, labels: Sequence[str], title: str, path: str | Path,
                  xlabels: Sequence[str] | None = None):
    """Rows `labels`, columns `xlabels` (default: the same labels); colours clipped to [0, 1], each
    finite value printed in its cell."""
    from matplotlib.figure import Figure

    xlabels = list(labels if xlabels is None else xlabels)
    fig = Figure(figsize=(1.0 + 0.8 * len(xlabels), 0.6 + 0.8 * len(labels)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(xlabels)):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    save_figure(fig, path, dpi=120)
    return fig


def causal_effect_bars(result: Mapping[str, Any], path: str | Path):
    """Per-class paired effects (shared minus matched-control drop) of the true-class logit and the
    accuracy from a matched causal test result (`clipmech.analysis.controls.matched_causal_test` with
    the drawings' description added), the mean over classes with its 95 % CI as a band; the title
    names the drawings, the trimmed fraction and the verdict."""
    from matplotlib.figure import Figure

    classes = list(result["per_class"])
    fig = Figure(figsize=(max(8.0, 2 + 0.9 * len(classes)), 4.4), layout="constrained")
    for ax, (key, label, scale) in zip(fig.subplots(1, 2), (("logit", "true-class logit", 1.0),
                                                            ("accuracy", "accuracy (points)", 100.0))):
        ax.bar(range(len(classes)), [scale * result["per_class"][k][f"effect_{key}"] for k in classes],
               color="#5f9ed1")
        e = result[f"effect_{key}"]
        ax.axhline(scale * e["mean"], color="black", lw=1)
        if e["ci"] is not None:
            ax.axhspan(scale * e["ci"][0], scale * e["ci"][1], color="0.6", alpha=0.3, lw=0)
        ax.axhline(0, color="0.3", lw=0.5)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"effect on {label}")
        ax.set_title(f"{label}: mean {format_estimate(e, scale, 3 if scale == 1 else 1)}", fontsize=8)
    tf = result["trimmed_fraction"]
    fig.suptitle(f"{result['test_domain']} C2: drop after ablating shared nodes minus drop after matched controls\n"
                 f"circuits discovered on {result['discovery_drawings']}, ablated on {result['ablation_drawings']} "
                 f"({result['n_images']} images)\n{'n/a' if tf is None else f'{tf:.0%}'} of shared nodes trimmed "
                 f"(no control of similar IG score); verdict (logit): {result['verdict']['verdict']}", fontsize=8)
    save_figure(fig, path, dpi=120)
    return fig


def patching_scatter(pooled: Mapping[str, Tensor], path: str | Path):
    """Attribution patching and IG estimates (y) against exact patching effects (x), one point per
    node, with the identity line. `pooled` {"exact", "attribution", "ig": [N]}."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    for ax, name in zip(fig.subplots(1, 2), ("attribution", "ig")):
        ax.scatter(pooled["exact"].cpu(), pooled[name].cpu(), s=3, alpha=0.4)
        ax.set_xlabel("exact patching effect")
        ax.set_ylabel(f"{name} estimate")
        ax.axline((0, 0), slope=1, color="grey", lw=0.8)
    save_figure(fig, path, dpi=120)
    return fig
