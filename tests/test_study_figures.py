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
