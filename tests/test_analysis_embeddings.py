"""Embedding separation scores (known answers on synthetic clusters) and the seeded UMAP figure."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipmech.analysis.embeddings import plot_umap, separation_scores, subsample_per_domain


def _clusters(offset, n_classes=4, per=12, n_domains=3, seed=0):
    """Rows = class centre + domain offset * domain direction + noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, 8)) * 3
    dirs = rng.normal(size=(n_domains, 8))
    E, c, d = [], [], []
    for dom in range(n_domains):
        for k in range(n_classes):
            E.append(centres[k] + offset * dirs[dom] + 0.3 * rng.normal(size=(per, 8)))
            c += [k] * per
            d += [dom] * per
    return np.concatenate(E), np.array(c), np.array(d)


def test_separated_domains_score_high_and_mixed_domains_score_chance():
    names = ["real", "clipart", "sketch"]
    E, c, d = _clusters(offset=4.0)
    sep = separation_scores(E, d, names, class_idx=c, folds=3)
    assert sep["overall"]["probe_accuracy"] > 0.95
    assert sep["class_conditional"]["silhouette"] > 0.5 and sep["class_conditional"]["n_classes"] == 4
    assert sep["overall"]["chance"] == pytest.approx(1 / 3)
    E0, c0, d0 = _clusters(offset=0.0)
    mixed = separation_scores(E0, d0, names, class_idx=c0, folds=3)
    assert mixed["overall"]["probe_accuracy"] < 0.6
    assert mixed["class_conditional"]["silhouette"] < 0.1
    # class-conditional scores remove class structure: overall silhouette by domain is low for both
    assert sep["overall"]["silhouette"] < sep["class_conditional"]["silhouette"]
    D = np.array(sep["overall"]["mean_distance"])
    assert D.shape == (3, 3) and (np.diag(D) == 0).all() and (D >= 0).all() and np.allclose(D, D.T)
    assert D[0, 1] > np.array(mixed["overall"]["mean_distance"])[0, 1]


def test_class_conditional_skips_and_errors():
    E, c, d = _clusters(offset=1.0, n_domains=2)
    c = c.copy()
    c[d == 1] += 10  # no class appears in both domains
    out = separation_scores(E, d, ["a", "b"], class_idx=c, folds=3)
    assert out["class_conditional"]["n_classes"] == 0 and out["class_conditional"]["skipped_classes"] == 8
    with pytest.raises(ValueError, match="at least 2 domains"):
        separation_scores(E[d == 0], d[d == 0], ["a", "b"])
    with pytest.raises(ValueError, match="one domain"):
        separation_scores(E, d[:-1], ["a", "b"])


def test_subsample_is_seeded_and_capped():
    d = np.array([0] * 10 + [1] * 3)
    a, b = subsample_per_domain(d, 4, seed=1), subsample_per_domain(d, 4, seed=1)
    assert np.array_equal(a, b) and (d[a] == 0).sum() == 4 and (d[a] == 1).sum() == 3


def test_umap_png_with_and_without_domain(tmp_path):
    E, c, d = _clusters(offset=4.0, per=6)
    names = ["real", "clipart", "sketch"]
    info = plot_umap(E, d, names, tmp_path / "umap.png", per_domain=20, densmap=False)
    assert (tmp_path / "umap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and info["n_points"] == 60
    info2 = plot_umap(E, d, names, tmp_path / "umap_wo.png", exclude="sketch", per_domain=20, densmap=False)
    assert info2["domains"] == ["real", "clipart"] and info2["excluded"] == "sketch"
    with pytest.raises(KeyError, match="sketch"):
        plot_umap(E, d, names, tmp_path / "x.png", exclude="skecth")


def test_umap_leaves_torchs_thread_count_alone():
    """numba resets OpenMP's thread count: under OMP_NUM_THREADS=1 a bare umap fit leaves torch on 2
    threads (oversubscribing a loaded machine); umap_2d restores the caller's count."""
    code = ("import numpy as np, torch; from clipmech.analysis.embeddings import umap_2d; before = torch.get_num_threads(); "
            "umap_2d(np.random.default_rng(0).normal(size=(60, 8))); print(before, torch.get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]
