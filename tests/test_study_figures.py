"""Figures: each writes a real PNG of sensible size; bad input fails with a clear message."""
import numpy as np
import pytest
from PIL import Image

from clipmech.study import figures as F


def _png(path):
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size[0] > 200 and img.size[1] > 150
    # A blank canvas would have a single colour; a drawn figure has many.
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    return img


def test_mean_ci_known_values():
    mean, half = F.mean_ci([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    # t_{0.975, 2} = 4.3027, sd = 1, n = 3
    assert half == pytest.approx(4.302652729911275 / np.sqrt(3))
    assert F.mean_ci([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        F.mean_ci([0.1, float("nan")])


def test_grouped_bars_and_epochs(tmp_path):
    acc = {"natural_only": {"sketch": [0.1, 0.12], "clipart": [0.2, 0.22]},
           "lod": {"sketch": [0.3, 0.28], "clipart": [0.35, 0.3]},
           "cg_low": {"sketch": [0.25]}, "cg_high": {"sketch": [0.4, 0.41, 0.39]}}
    _png(F.grouped_bars(acc, tmp_path / "bars.png"))
    curves = {"lod": [[0.0, 0.2, 0.3], [0.0, 0.25, 0.31]], "cg_high": [0.0, 0.1, 0.5]}
    _png(F.accuracy_over_epochs(curves, tmp_path / "epochs.png"))
    with pytest.raises(ValueError, match="no setups"):
        F.grouped_bars({}, tmp_path / "x.png")


def test_cka_heatmaps_umap_scatter(tmp_path):
    layers = ["visual.hook_act1", "visual.layer1.0.hook_out", "visual.layer2.0.hook_out", "visual.attnpool.hook_out"]
    doms = ["real", "clipart", "sketch"]
    cka = {("clipart", "real"): [0.9, 0.8, 0.7, 0.6], ("real", "sketch"): [0.8, 0.5, 0.4, 0.6],
           ("clipart", "sketch"): [0.85, 0.6, 0.5, 0.7]}
    _png(F.cka_per_layer(cka, layers, "sketch", tmp_path / "cka.png"))
    with pytest.raises(ValueError, match="3 values but there are 4 layers"):
        F.cka_per_layer({("a", "b"): [1, 2, 3]}, layers, "a", tmp_path / "bad.png")
    m = np.eye(3) * 0.5 + 0.5
    _png(F.jaccard_heatmaps(m, m * 0.8, doms, tmp_path / "jac.png"))
    _png(F.feature_sharing_matrix(m, doms, tmp_path / "share.png"))
    with pytest.raises(ValueError, match="does not match 2 labels"):
        F.feature_sharing_matrix(m, doms[:2], tmp_path / "bad.png")
    rng = np.random.default_rng(0)
    _png(F.umap_by_domain(rng.normal(size=(60, 2)), np.repeat([0, 1, 2], 20), doms, tmp_path / "umap.png"))
    with pytest.raises(ValueError, match=r"coords \[N, 2\]"):
        F.umap_by_domain(rng.normal(size=(60, 3)), np.zeros(60), doms, tmp_path / "bad.png")
    pts = {"cka_mid": [(0.1, 0.2, "lod"), (0.3, 0.4, "cg_high"), (0.2, 0.1, "natural_only")],
           "edge_jaccard": [(0.1, 0.2, "lod"), (0.3, 0.4, "cg_high"), (0.2, 0.1, "natural_only")]}
    corr = {"cka_mid": {"rho": 0.5, "ci_low": -1.0, "ci_high": 1.0, "n": 3},
            "edge_jaccard": {"rho": None, "reason": "a variable is constant across models", "n": 3}}
    _png(F.sharedness_scatter(pts, corr, tmp_path / "scatter.png"))


# ------------------------------------------------------------------- legibility at the quickstart's scale
SETUPS = ["natural_only", "lod", "cg_low", "cg_high"]
DOMAINS = ["clipart", "flat", "painting", "quickdraw", "real", "sketch"]
RN50_POINTS = (["visual.hook_act1", "visual.hook_act2", "visual.hook_act3", "visual.hook_avgpool"]
               + [f"visual.layer{s}.{i}.hook_out" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(n)]
               + ["visual.attnpool.hook_out"])


def _models(rng):
    """The quickstart's models: 4 setups x 2 test domains x 3 seeds, with controls and faithfulness."""
    models = []
    for setup in SETUPS:
        for test in ("clipart", "painting"):
            for seed in range(3):
                null = lambda: {k: {"mean": float(v)} for k, v in zip(("score", "floor", "ceiling", "floor_untrained"),
                                                                       rng.uniform(0, 1, 4))}  # noqa: E731
                faith = {d: {how: {"f_mean": list(rng.normal(0.5, 1.5, 7))} for how in ("mean", "resample")}
                         for d in DOMAINS}
                models.append({"setup": setup, "test_domain": test, "seed": seed, "run_id": f"{setup}-{test}-s{seed}",
                               "controls": {"nulls": {s: null() for s in SCORES},
                                            "faithfulness": {"sizes": [1, 2, 5, 10, 20, 50, 100], "domains": faith}}})
    return models


SCORES = ("node_jaccard", "edge_jaccard", "wl", "feature_sharing", "cka_mid")


def test_every_study_figure_is_legible_at_the_quickstarts_scale():
    rng = np.random.default_rng(0)
    models = _models(rng)
    acc = {s: {d: list(rng.uniform(0, 1, 3)) for d in ("clipart", "painting")} for s in SETUPS}
    pairs = [(a, b) for i, a in enumerate(DOMAINS) for b in DOMAINS[i + 1:]]
    m = rng.uniform(0, 1, (6, 6))
    figures = {
        "fig2": F.grouped_bars(acc),
        "epochs": F.accuracy_over_epochs({s: rng.uniform(0, 1, (3, 11)) for s in SETUPS}),
        "cka": F.cka_per_layer({p: list(rng.uniform(0, 1, len(RN50_POINTS))) for p in pairs}, RN50_POINTS, "clipart"),
        "jaccard": F.jaccard_heatmaps(m, m, DOMAINS),
        "sharing": F.feature_sharing_matrix(m, DOMAINS),
        "umap": F.umap_by_domain(rng.normal(size=(600, 2)), np.repeat(np.arange(6), 100), DOMAINS),
        "scatter": F.sharedness_scatter(
            {s: [(float(x), float(y), SETUPS[i % 4]) for i, (x, y) in enumerate(rng.uniform(0, 1, (24, 2)))]
             for s in SCORES}, {s: {"rho": 0.1, "ci_low": -0.3, "ci_high": 0.5, "n": 24} for s in SCORES}),
        "controls": F.sharedness_controls(models, SCORES),
        "faithfulness": F.faithfulness_curves(models),
    }
    for name, fig in figures.items():
        assert F.legibility_problems(fig) == [], name


def test_legibility_check_boundaries():
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 2))
    ax = fig.subplots()
    ax.set_xticks(range(12), [f"a long label {i}" for i in range(12)])
    problems = F.legibility_problems(fig)
    assert any("overlap" in p and "'a long label 0' and 'a long label 1'" in p for p in problems)
    fig = Figure(figsize=(3, 3))
    ax = fig.subplots()
    ax.set_xticks([0, 1], ["x", "y"], fontsize=F.MIN_FONT_PT)
    ax.set_yticks([0, 1], ["p", "q"], fontsize=F.MIN_FONT_PT)
    ax.text(0.5, 0.5, "exactly the minimum", fontsize=F.MIN_FONT_PT)
    assert F.legibility_problems(fig) == []
    ax.text(0.1, 0.9, "too small", fontsize=F.MIN_FONT_PT - 0.1)
    assert F.legibility_problems(fig) == [f"text 'too small' at {F.MIN_FONT_PT - 0.1:g} pt < 7 pt"]


def test_figures_draw_into_a_given_figure_or_write_a_file(tmp_path):
    from matplotlib.figure import Figure
    models = _models(np.random.default_rng(1))[:6]
    fig = Figure()
    assert F.faithfulness_curves(models, fig=fig) is fig and len(fig.axes) == 2 * 3
    path = F.sharedness_controls(models, SCORES, tmp_path / "controls.png")
    _png(path)
