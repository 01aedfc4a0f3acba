"""The study's figures: pure functions from plain dicts / arrays to a figure.

Every function takes already-computed numbers (no models, no datasets), draws one figure with
labelled axes and units in a colour-blind-safe palette (Okabe & Ito 2008 for categories, viridis /
cividis for heatmaps) and, given a `path`, writes it atomically as PNG and returns the path;
without one it returns the matplotlib Figure (drawn into `fig` when the caller passes an empty
one, e.g. in a notebook). That keeps the figures testable without training anything and lets
`experiments/` redraw them from stored results. Every text is at least `MIN_FONT_PT` points at the
size the figure is written, and `legibility_problems` checks that no tick labels overlap.

We build `matplotlib.figure.Figure` objects directly instead of going through pyplot: no global
state, no GUI backend, safe to call from any thread.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from scipy import stats

from clipmech.utils import PathLike, save_figure

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
    "natural_only_steps": "natural-only, steps-matched",
}


MIN_FONT_PT = 7.0  # smallest text on any study figure, at the size it is written
FAITHFULNESS_YLIM = (-2.0, 3.0)  # f outside this range is drawn clipped (see faithfulness_curves)


def _save(fig: Figure, path: PathLike, dpi: int = 130) -> Path:
    return save_figure(fig, path, dpi)


def _figure(fig: Figure | None, **kwargs: Any) -> Figure:
    """The caller's (empty) Figure, or a new one built with `kwargs`."""
    return Figure(**kwargs) if fig is None else fig


def _finish(fig: Figure, path: PathLike | None) -> Path | Figure:
    return fig if path is None else _save(fig, path)


def legibility_problems(fig: Figure, min_pt: float = MIN_FONT_PT) -> list[str]:
    """What makes `fig` hard to read, as lines: visible text smaller than `min_pt` points, and
    pairs of visible texts (tick labels, titles, axis labels, legend entries, annotations) whose
    drawn extents overlap (matplotlib's renderer, axis-aligned boxes, so a rotated label needs its
    whole bounding box free; touching edges do not count). Empty for a legible figure. Cost: one draw of the figure, then a pairwise check of its texts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # lays out (constrained layout, tick positions) as saving would
    hidden = _hidden_tick_labels(fig)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]
    problems = [f"text {t.get_text()!r} at {t.get_fontsize():g} pt < {min_pt:g} pt"
                for t in texts if t.get_fontsize() < min_pt]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            x0, y0 = max(boxes[a].x0, boxes[b].x0), max(boxes[a].y0, boxes[b].y0)
            x1, y1 = min(boxes[a].x1, boxes[b].x1), min(boxes[a].y1, boxes[b].y1)
            if x1 - x0 > 0.5 and y1 - y0 > 0.5:  # more than half a pixel each way
                problems.append(f"texts {texts[a].get_text()!r} and {texts[b].get_text()!r} overlap")
    return problems


def _hidden_tick_labels(fig: Figure) -> set[int]:
    """ids of the tick labels matplotlib keeps but does not draw: ticks outside the view interval."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 * (hi - lo) <= tick.get_loc() <= hi + 1e-9 * (hi - lo):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return hidden


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


def grouped_bars(acc: Mapping[str, Mapping[str, Sequence[float]]], path: PathLike | None = None,
                 ylabel: str = "C2 top-1 accuracy, class-balanced (%)",
                 title: str = "Generalization to the test domain's held-out classes",
                 ci: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
                 fig: Figure | None = None) -> Path | Figure:
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
    fig = _figure(fig, figsize=(max(5.0, 1.2 * len(domains) * len(setups) * 0.45 + 2), 3.8))
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
    return _finish(fig, path)


def accuracy_over_epochs(curves: Mapping[str, Sequence[Sequence[float]]], path: PathLike | None = None,
                         ylabel: str = "C2 top-1 accuracy, class-balanced (%)",
                         title: str = "Accuracy during training", epochs: Sequence[int] | None = None,
                         fig: Figure | None = None) -> Path | Figure:
    """Lines of accuracy (in [0, 1]) against epoch: `curves[label]` = [n_seeds][n_points] values at
    `epochs` (default 0, 1, 2, ...).

    Draws the mean over seeds with a min-max band; epoch 0 is the untrained model.
    """
    if not curves:
        raise ValueError("accuracy_over_epochs: no curves given")
    fig = _figure(fig, figsize=(6, 3.8))
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
    return _finish(fig, path)


def cka_per_layer(cka: Mapping[tuple[str, str], Sequence[float]], layers: Sequence[str],
                  test_domain: str, path: PathLike | None = None,
                  title: str = "Domain similarity of class centroids per layer",
                  fig: Figure | None = None) -> Path | Figure:
    """CKA (unitless, in [0, 1] up to estimator noise) per analysis point for each domain pair.

    `cka[(a, b)]` = one value per entry of `layers`. Pairs containing `test_domain` are drawn in
    colour, all other pairs in thin grey, so "is the test domain less shared?" reads at a glance.
    """
    if not cka:
        raise ValueError("cka_per_layer: no domain pairs given")
    fig = _figure(fig, figsize=(max(6.0, 0.35 * len(layers) + 2), 4.0))
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
    return _finish(fig, path)


def _short_layer(name: str) -> str:
    """'visual.layer2.0.hook_out' -> 'layer2.0'; keeps tick labels readable."""
    return name.removeprefix("visual.").replace(".hook_out", "").replace("hook_", "")


def _heatmap(ax, matrix: np.ndarray, labels: Sequence[str], title: str, cbar_label: str,
             vmin: float = 0.0, vmax: float = 1.0) -> None:
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"{title}: matrix shape {matrix.shape} does not match {len(labels)} labels")
    im = ax.imshow(matrix, cmap="cividis", vmin=vmin, vmax=vmax)
    # Vertical labels: rotated text needs its whole bounding box free (see legibility_problems).
    ax.set_xticks(range(len(labels)), labels, rotation=90)
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


def jaccard_heatmaps(node: np.ndarray, edge: np.ndarray, domains: Sequence[str], path: PathLike | None = None,
                     title: str = "Circuit overlap between domains", fig: Figure | None = None) -> Path | Figure:
    """Two [D, D] heatmaps side by side: node and edge Jaccard (unitless, 0-1) of per-class circuits."""
    node = _finite(node, "node Jaccard")
    edge = _finite(edge, "edge Jaccard")
    fig = _figure(fig, figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    _heatmap(axes[0], node, domains, "node Jaccard (top-10% nodes per layer)", "Jaccard index")
    _heatmap(axes[1], edge, domains, "edge Jaccard (top-3 incoming edges)", "Jaccard index")
    fig.suptitle(title)
    return _finish(fig, path)


def feature_sharing_matrix(matrix: np.ndarray, domains: Sequence[str], path: PathLike | None = None,
                           title: str = "SAE feature sharing on C2 classes", fig: Figure | None = None) -> Path | Figure:
    """[D, D] heatmap of the paper's Alg. 2 sharing score (mean top-K overlap, unitless, 0-1)."""
    fig = _figure(fig, figsize=(6, 4.8), layout="constrained")
    _heatmap(fig.subplots(), _finite(matrix, "feature sharing"), domains, title,
             "shared top-K SAE latents (fraction)")
    return _finish(fig, path)


def umap_by_domain(coords: np.ndarray, domain_idx: Sequence[int], domains: Sequence[str],
                   path: PathLike | None = None, title: str = "Image embeddings (UMAP) coloured by domain",
                   fig: Figure | None = None) -> Path | Figure:
    """Scatter of a 2-D embedding `coords` [N, 2], one colour and marker per domain."""
    coords = _finite(coords, "UMAP coordinates")
    domain_idx = np.asarray(domain_idx)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(domain_idx) != len(coords):
        raise ValueError(f"umap_by_domain needs coords [N, 2] and N domain indices; got "
                         f"{coords.shape} and {len(domain_idx)}")
    fig = _figure(fig, figsize=(5.5, 4.5))
    ax = fig.subplots()
    for d, name in enumerate(domains):
        pts = coords[domain_idx == d]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.75, color=OKABE_ITO[d % len(OKABE_ITO)],
                   marker=MARKERS[d % len(MARKERS)], label=name, lw=0)
    ax.set_xlabel("UMAP 1 (arbitrary units)")
    ax.set_ylabel("UMAP 2 (arbitrary units)")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=2)
    return _finish(fig, path)


def sharedness_scatter(points: Mapping[str, Sequence[tuple[float, float, str]]],
                       correlations: Mapping[str, Mapping[str, float | None]], path: PathLike | None = None,
                       title: str = "Does sharedness go with compositional generalization?",
                       fig: Figure | None = None) -> Path | Figure:
    """One panel per sharedness measure: x = measure, y = C2 accuracy (in [0, 1]) of each model.

    `points[measure]` = [(sharedness, c2_acc, setup), ...]; `correlations[measure]` = {"rho",
    "ci_low", "ci_high", "n"} (within-domain Spearman averaged over test domains, see
    `clipmech.study.stats.correlation`), shown in the panel title.
    """
    measures = list(points)
    if not measures:
        raise ValueError("sharedness_scatter: no measures given")
    fig = _figure(fig, figsize=(4.0 * len(measures) + 1.5, 3.9), layout="constrained")
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
    return _finish(fig, path)


def _model_groups(models: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[Mapping[str, Any]]]]:
    """[(setup, test_domain, models sorted by seed)], setups in the paper's order, then as given."""
    order = {s: i for i, s in enumerate(SETUP_LABELS)}
    keys = sorted(dict.fromkeys((m["setup"], m["test_domain"]) for m in models),
                  key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))
    return [(s, d, sorted((m for m in models if (m["setup"], m["test_domain"]) == (s, d)), key=lambda m: m["seed"]))
            for s, d in keys]


def sharedness_controls(models: Sequence[Mapping[str, Any]], scores: Sequence[str], path: PathLike | None = None,
                        title: str = "Sharedness scores against their floor and ceiling",
                        fig: Figure | None = None) -> Path | Figure:
    """One panel per score in `scores`, one row per model: its score (o), the band from floor
    (class-permuted) to ceiling (disjoint drawings) and the untrained model's score (x). Rows are
    grouped by setup (a bold header row each) and labelled once, '<test domain> s<seed>', on the
    left. `models[i]` = {"setup", "test_domain", "seed", "controls": {"nulls": {score: {"score",
    "floor", "ceiling", "floor_untrained": {"mean"} or None}}}}."""
    groups = _model_groups(models)
    if not groups or not scores:
        raise ValueError("sharedness_controls: no models or no scores given")
    rows: list[tuple[str, Mapping[str, Any] | None]] = []
    for i, (setup, domain, members) in enumerate(groups):
        if i == 0 or groups[i - 1][0] != setup:
            rows.append((SETUP_LABELS.get(setup, setup), None))
        rows += [(f"{domain} s{m['seed']}", m) for m in members]
    fig = _figure(fig, figsize=(2.1 * len(scores) + 1.8, 0.19 * len(rows) + 1.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(scores), sharey=True))
    y = np.arange(len(rows))
    mean = lambda n, k: (n.get(k) or {}).get("mean")  # noqa: E731
    for ax, name in zip(axes, scores):
        for i, (_, m) in enumerate(rows):
            if m is None:
                continue
            n = m["controls"]["nulls"][name]
            lo, hi = mean(n, "floor"), mean(n, "ceiling")
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [i, i], color=OKABE_ITO[1], lw=5, alpha=0.45, solid_capstyle="butt")
            for v, style in ((mean(n, "floor_untrained"), "x"), (mean(n, "score"), "o")):
                if v is not None:
                    ax.plot(v, i, style, color="0.35" if style == "x" else OKABE_ITO[4], ms=4)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (unitless)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        for i, (_, m) in enumerate(rows):
            if m is None:
                ax.axhline(i, color="0.85", lw=6, zorder=0)
    axes[0].set_yticks(y, [label for label, _ in rows])
    for tick, (_, m) in zip(axes[0].get_yticklabels(), rows):
        tick.set_fontweight("bold" if m is None else "normal")
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    handles = [Line2D([], [], color=OKABE_ITO[1], lw=5, alpha=0.45, label="floor (permuted) to ceiling"),
               Line2D([], [], ls="", marker="x", color="0.35", label="untrained model"),
               Line2D([], [], ls="", marker="o", color=OKABE_ITO[4], label="trained model")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def faithfulness_curves(models: Sequence[Mapping[str, Any]], path: PathLike | None = None,
                        title: str = "Faithfulness of the circuits as nodes are kept",
                        fig: Figure | None = None) -> Path | Figure:
    """Small multiples, one panel per model (rows: setup and test domain, columns: seeds): mean
    faithfulness f(x) of its training-drawing circuits on held-out drawings when only the top x of
    nodes per point is kept, one colour per domain (solid: mean ablation, dashed: resample; the test
    domain thick). `models[i]["controls"]["faithfulness"]` = {"sizes": [% kept], "domains": {domain:
    {"mean" | "resample": {"f_mean": [f per size] or None}}}}. Axes are shared and labelled once;
    the y axis shows [FAITHFULNESS_YLIM] (the axis label says when a curve leaves it: a few
    one-class circuits reach |f| > 10 where m(N) - m(empty) is small)."""
    groups = _model_groups(models)
    if not groups:
        raise ValueError("faithfulness_curves: no models given")
    seeds = sorted({m["seed"] for _, _, members in groups for m in members})
    domains = list(dict.fromkeys(d for m in models for d in m["controls"]["faithfulness"]["domains"]))
    fig = _figure(fig, figsize=(1.9 * len(seeds) + 1.6, 1.35 * len(groups) + 1.3), layout="constrained")
    axes = fig.subplots(len(groups), len(seeds), sharex=True, sharey=True, squeeze=False)
    for r, (setup, test_domain, members) in enumerate(groups):
        by_seed = {m["seed"]: m for m in members}
        for c, seed in enumerate(seeds):
            ax = axes[r, c]
            ax.axhline(1, color="0.5", lw=0.5)
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"seed {seed}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{SETUP_LABELS.get(setup, setup)}\n{test_domain}", fontsize=7)
            m = by_seed.get(seed)
            if m is None:
                continue
            faith = m["controls"]["faithfulness"]
            x = [0.0] + [s / 100 for s in faith["sizes"]]
            for d, per in faith["domains"].items():
                colour = OKABE_ITO[domains.index(d) % len(OKABE_ITO)]
                for how, style in (("mean", "-"), ("resample", "--")):
                    f = per[how]["f_mean"]
                    if f is not None:
                        ax.plot(x, [0.0] + list(f), style, color=colour, lw=1.8 if d == test_domain else 0.8)
    values = [v for m in models for per in m["controls"]["faithfulness"]["domains"].values()
              for how in ("mean", "resample") for v in (per[how]["f_mean"] or [])] + [0.0, 1.0]
    lo, hi = max(min(values), FAITHFULNESS_YLIM[0]), min(max(values), FAITHFULNESS_YLIM[1])
    axes[0, 0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    clipped = (lo, hi) != (min(values), max(values))
    for ax in axes.flat:
        ax.label_outer()
    handles = [Line2D([], [], color=OKABE_ITO[i % len(OKABE_ITO)], label=d) for i, d in enumerate(domains)]
    handles += [Line2D([], [], color="0.3", ls=ls, label=f"{how} ablation") for how, ls in (("mean", "-"),
                                                                                           ("resample", "--"))]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)
    fig.supxlabel("fraction of nodes kept per point (thick: the model's test domain)", fontsize=8)
    fig.supylabel("faithfulness f(x)" + (f", axis clipped to [{lo:g}, {hi:g}]" if clipped else ""), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def added_domains_panels(panels: Mapping[str, Mapping[str, Any]], path: PathLike | None = None,
                         title: str = "Domain interpolation", fig: Figure | None = None) -> Path | Figure:
    """One panel per quantity against the number of domains added to CG-low (Fig. 3 analogue).

    `panels[name]` = {"ylabel", "scale" (100 for accuracies in [0, 1], else 1), "points": [(n_added,
    value, label)] one per model, "by_k": {k: (mean, ci_low, ci_high)}, "slope": (estimate, low, high)
    or None, "endpoints": {label: mean} drawn as dashed lines}. Each model is a dot (jittered), each
    number added its bootstrap mean and 95 % CI.
    """
    names = list(panels)
    if not names:
        raise ValueError("added_domains_panels: no panels given")
    fig = _figure(fig, figsize=(3.8 * len(names) + 1.8, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    rng = np.random.default_rng(0)  # jitter only
    for ax, name in zip(axes, names):
        p, scale = panels[name], panels[name].get("scale", 1.0)
        pts = np.array([(k, v) for k, v, _ in p["points"]], dtype=float).reshape(-1, 2)
        ax.scatter(pts[:, 0] + rng.uniform(-0.12, 0.12, len(pts)), scale * pts[:, 1], s=10, color="0.55",
                   label="one model")
        ks = sorted(p["by_k"])
        mean, low, high = (np.array([p["by_k"][k][i] for k in ks], dtype=float) * scale for i in range(3))
        ax.errorbar(ks, mean, yerr=[mean - low, high - mean], color=OKABE_ITO[3], marker="o", capsize=3,
                    label="mean, 95% CI")
        for i, (label, value) in enumerate(p.get("endpoints", {}).items()):
            ax.axhline(scale * value, ls="--", lw=1, color=OKABE_ITO[(i + 4) % len(OKABE_ITO)],
                       label=SETUP_LABELS.get(label, label.replace("_", " ")))
        sub = p.get("slope")
        ax.set_title(name if sub is None else f"{name}\nslope {scale * sub[0]:+.2g} / domain "
                     f"[{scale * sub[1]:+.2g}, {scale * sub[2]:+.2g}]", fontsize=8)
        ax.set_xticks(ks)
        ax.set_xlabel("domains added to CG-low")
        ax.set_ylabel(p["ylabel"])
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    return _finish(fig, path)


def coefficient_forest(coefs: Mapping[str, Mapping[str, Mapping[str, float]]], terms: Sequence[str],
                       path: PathLike | None = None, xlabel: str = "change in C2 accuracy per SD (points)",
                       title: str = "Mixed-model coefficients", fig: Figure | None = None) -> Path | Figure:
    """Estimates and CIs of `terms` per measure: `coefs[measure][term]` = {"estimate", "ci_low",
    "ci_high"} in accuracy units ([0, 1], drawn in points). One row per (measure, term)."""
    rows = [(m, t) for m in coefs for t in terms if t in coefs[m]]
    if not rows:
        raise ValueError("coefficient_forest: no coefficients given")
    fig = _figure(fig, figsize=(6.5, 0.42 * len(rows) + 1.4), layout="constrained")
    ax = fig.subplots()
    for y, (m, t) in enumerate(rows):
        c = coefs[m][t]
        ax.errorbar(100 * c["estimate"], y, xerr=[[100 * (c["estimate"] - c["ci_low"])],
                                                  [100 * (c["ci_high"] - c["estimate"])]],
                    color=OKABE_ITO[terms.index(t) % len(OKABE_ITO)], marker=MARKERS[terms.index(t)], capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{m}: {t}" for m, t in rows])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, path)
