"""clipmech.study.mixed_model: REML crossed random intercepts against closed forms and simulation,
and the threshold (hinge / saturating vs linear) bootstrap test."""
import itertools

import numpy as np
import pytest

from clipmech.study import mixed_model as mm
from clipmech.study.mixed_model import fit_crossed_lmm, threshold_test


def _one_way(tau: float, seed: int, n_groups: int = 8, per: int = 6):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per)
    y = 1.0 + rng.normal(0, tau, n_groups)[g] + rng.normal(0, 1, n_groups * per)
    means = np.bincount(g, y) / per
    msb = per * np.sum((means - y.mean()) ** 2) / (n_groups - 1)
    msw = np.sum((y - means[g]) ** 2) / (n_groups * per - n_groups)
    return y, g, msb, msw


def test_balanced_one_way_matches_anova():
    y, g, msb, msw = _one_way(tau=1.0, seed=1)
    assert msb > msw
    fit = fit_crossed_lmm(y, np.ones((len(y), 1)), {"g": g}, ["intercept"])
    assert fit["variance"]["g"] == pytest.approx((msb - msw) / 6, rel=1e-5, abs=1e-6)
    assert fit["variance"]["residual"] == pytest.approx(msw, rel=1e-5)
    coef = fit["coef"]["intercept"]
    assert coef["estimate"] == pytest.approx(y.mean(), abs=1e-10)
    assert coef["se"] == pytest.approx(np.sqrt(msb / len(y)), rel=1e-5)
    assert coef["df"] == 7 and fit["levels"] == {"g": 8} and fit["converged"]


def _no_group_effect(seed: int):
    """Crossed data whose OLS residuals sum to 0 (weighted) in every level: MSB < MSW everywhere."""
    rng = np.random.default_rng(seed)
    a, b = np.repeat(np.arange(6), 10), np.tile(np.arange(10), 6)
    X = np.column_stack([np.ones(60), rng.normal(size=60)])
    w = rng.uniform(0.5, 3, 60)
    D = np.column_stack([X, np.eye(6)[a], np.eye(10)[b]]) * np.sqrt(w)[:, None]
    noise = rng.normal(size=60) * np.sqrt(w)
    resid = noise - D @ np.linalg.lstsq(D, noise, rcond=None)[0]
    y = X @ [0.5, 2.0] + resid / np.sqrt(w)
    return y, X, w, {"a": a, "b": b}


def test_no_group_effect_gives_zero_variance_and_weighted_ols():
    y, X, w, groups = _no_group_effect(seed=2)
    fit = fit_crossed_lmm(y, X, groups, ["intercept", "x"], weights=w)
    assert fit["variance"]["a"] == 0.0 and fit["variance"]["b"] == 0.0
    sw = np.sqrt(w)
    beta, rss = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[:2]
    se = np.sqrt(rss[0] / 58 * np.diag(np.linalg.inv((X * w[:, None]).T @ X)))
    for j, name in enumerate(["intercept", "x"]):
        assert fit["coef"][name]["estimate"] == pytest.approx(beta[j], abs=1e-8)
        assert fit["coef"][name]["se"] == pytest.approx(se[j], rel=1e-8)
    assert fit["coef"]["x"]["df"] == 58  # in no factor: n - rank(X)
    assert fit["coef"]["intercept"]["df"] == 6 - 1  # fewest-level factor containing it


def _crossed(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 7, n), rng.integers(0, 9, n)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = X @ [1.0, 0.5] + rng.normal(0, 0.7, 7)[a] + rng.normal(0, 0.5, 9)[b] + rng.normal(size=n)
    return y, X, {"a": a, "b": b}, rng.uniform(0.5, 2, n)


def test_weights_are_precision_weights():
    """Scaling all weights by c leaves beta, se and tau^2 alone and scales sigma^2 by c."""
    y, X, groups, w = _crossed(seed=3)
    base = fit_crossed_lmm(y, X, groups, ["intercept", "x"], weights=w)
    scaled = fit_crossed_lmm(y, X, groups, ["intercept", "x"], weights=3 * w)
    assert base["variance"]["a"] > 0 and base["variance"]["b"] > 0
    for name in ("intercept", "x"):
        for key in ("estimate", "se"):
            assert scaled["coef"][name][key] == pytest.approx(base["coef"][name][key], rel=1e-6)
    for g in ("a", "b"):
        assert scaled["variance"][g] == pytest.approx(base["variance"][g], rel=1e-5)
    assert scaled["variance"]["residual"] == pytest.approx(3 * base["variance"]["residual"], rel=1e-6)


def test_duplicated_rows_equal_weight_two():
    # at any fixed theta the penalised fit is identical (only the REML row count differs) ...
    y, X, groups, _ = _crossed(seed=4)
    codes = mm._encode(groups)
    twice = mm._crossprods(np.tile(y, 2), np.tile(X, (2, 1)), np.ones(2 * len(y)),
                           mm._encode({g: np.tile(v, 2) for g, v in groups.items()}))
    weighted = mm._crossprods(y, X, np.full(len(y), 2.0), codes)
    theta = np.array([0.7, 0.4])
    p_twice, p_weighted = mm._profile(twice, theta), mm._profile(weighted, theta)
    np.testing.assert_allclose(p_twice["beta"], p_weighted["beta"], rtol=1e-10)
    assert p_twice["r2"] == pytest.approx(p_weighted["r2"], rel=1e-10)
    # ... and where the variance components are 0 so are the fitted coefficients
    y, X, w, groups = _no_group_effect(seed=5)
    w = np.ones(len(y))
    dup = fit_crossed_lmm(np.tile(y, 2), np.tile(X, (2, 1)), {g: np.tile(v, 2) for g, v in groups.items()},
                          ["intercept", "x"])
    wt = fit_crossed_lmm(y, X, groups, ["intercept", "x"], weights=2 * w)
    for name in ("intercept", "x"):
        assert dup["coef"][name]["estimate"] == pytest.approx(wt["coef"][name]["estimate"], abs=1e-10)


def test_analytic_gradient_matches_finite_differences():
    y, X, groups, w = _crossed(seed=6)
    cp = mm._crossprods(y, X, w, mm._encode(groups))
    theta, eps = np.array([0.6, 0.3]), 1e-6
    numeric = [(mm._profile(cp, theta + eps * e)["reml"] - mm._profile(cp, theta - eps * e)["reml"])
               / (2 * eps) for e in np.eye(2)]
    np.testing.assert_allclose(mm._profile(cp, theta, gradient=True)["gradient"], numeric, rtol=1e-5)


PLANTED = np.array([0.5, 0.05, -0.03, 0.02, 0.04, 0.3, 0.2])
NAMES = ["intercept", "inc_a", "inc_b", "inc_c", "inc_d", "between", "within"]


def _study(rng: np.random.Generator):
    """16 mixtures (subsets of 4 domains) x 5 seeds = 80 models, 45 classes, C2 ~ Binomial(2, p)."""
    inclusion = np.array(list(itertools.product([0, 1], repeat=4)), dtype=float)
    mixture, seed = np.repeat(np.arange(16), 5), np.tile(np.arange(5), 16)
    shared = rng.normal(0, 0.3, 16)[mixture] + rng.normal(0, 0.2, 80)
    between = (np.bincount(mixture, shared) / 5)[mixture]
    X_model = np.column_stack([np.ones(80), inclusion[mixture], between, shared - between])
    eta = (X_model @ PLANTED + rng.normal(0, 0.04, 16)[mixture] + rng.normal(0, 0.02, 5)[seed]
           + rng.normal(0, 0.03, 80))
    model, cls = np.repeat(np.arange(80), 45), np.tile(np.arange(45), 80)
    p = np.clip(eta[model] + rng.normal(0, 0.1, 45)[cls], 0.01, 0.99)
    y = rng.binomial(2, p) / 2
    groups = {"mixture": mixture[model], "model": model, "class": cls, "seed": seed[model]}
    return y, X_model[model], groups


def test_coverage_of_between_and_within_slopes_in_crossed_design():
    rng = np.random.default_rng(20240601)
    covered = {"between": 0, "within": 0}
    n_studies = 200
    for i in range(n_studies):
        y, X, groups = _study(rng)
        fit = fit_crossed_lmm(y, X, groups, NAMES, weights=np.full(len(y), 2.0))
        if i == 0:
            assert fit["coef"]["between"]["df"] == 16 - 6
            assert fit["coef"]["within"]["df"] == 80 - 7
            assert fit["levels"] == {"mixture": 16, "model": 80, "class": 45, "seed": 5}
        for name in covered:
            c = fit["coef"][name]
            covered[name] += c["ci_low"] <= PLANTED[NAMES.index(name)] <= c["ci_high"]
    coverage = {k: v / n_studies for k, v in covered.items()}
    print("95% CI coverage over", n_studies, "studies:", coverage)
    assert coverage["between"] >= 0.90 and coverage["within"] >= 0.90


def _contained(n_levels: int):
    rng = np.random.default_rng(7)
    a, b = np.repeat(np.arange(n_levels), 20), np.tile(np.arange(10), 2 * n_levels)
    X = np.column_stack([np.ones(len(a)), rng.normal(size=n_levels)[a]])
    y = X @ [1.0, 0.5] + rng.normal(0, 0.3, n_levels)[a] + rng.normal(size=len(a))
    return y, X, {"a": a, "b": b}


def test_containment_df_boundary():
    y, X, groups = _contained(n_levels=3)  # p + 1 levels
    fit = fit_crossed_lmm(y, X, groups, ["intercept", "x_a"])
    assert fit["coef"]["x_a"]["df"] == 1 and fit["coef"]["intercept"]["df"] == 1
    y, X, groups = _contained(n_levels=2)  # p levels
    with pytest.raises(ValueError, match=r"df < 1 .*x_a"):
        fit_crossed_lmm(y, X, groups, ["intercept", "x_a"])


def test_input_errors_name_the_problem():
    y, X, groups, w = _crossed(seed=8)
    names = ["intercept", "x"]
    with pytest.raises(ValueError, match="y contains NaN"):
        fit_crossed_lmm(np.where(np.arange(len(y)) == 3, np.nan, y), X, groups, names)
    with pytest.raises(ValueError, match="length mismatch.*group 'b'"):
        fit_crossed_lmm(y, X, {"a": groups["a"], "b": groups["b"][:-1]}, names)
    with pytest.raises(ValueError, match="length mismatch: y"):
        fit_crossed_lmm(y[:-1], X, groups, names)
    with pytest.raises(ValueError, match=r"rank-deficient \(rank 2 < 3\); columns \['x2?'\]"):
        fit_crossed_lmm(y, np.column_stack([X, 2 * X[:, 1]]), groups, names + ["x2"])
    with pytest.raises(ValueError, match="weights must be positive"):
        fit_crossed_lmm(y, X, groups, names, weights=np.where(np.arange(len(y)) == 0, 0.0, w))


def _grid_step(x: np.ndarray, grid: int = 25) -> float:
    lo, hi = np.quantile(x, (0.2, 0.8))
    return (hi - lo) / (grid - 1)


@pytest.mark.parametrize("shape", ["hinge", "saturating"])
def test_threshold_test_detects_planted_breakpoint(shape):
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 1, 80)
    c = np.median(x)
    mean = np.maximum(0, x - c) if shape == "hinge" else np.minimum(x, c)
    y = 0.2 + 1.0 * mean + rng.normal(0, 0.03, 80)
    out = threshold_test(x, y)
    assert out[shape]["test_vs_linear"]["p"] < 0.01
    assert abs(out[shape]["c"] - c) <= _grid_step(x) + 1e-12
    assert out["preferred_by_aic"] == shape


def test_threshold_test_linear_data_not_significant_and_size():
    rng = np.random.default_rng(10)
    x = rng.uniform(0, 1, 80)
    out = threshold_test(x, 0.3 + 0.5 * x + rng.normal(0, 0.1, 80))
    assert out["hinge"]["test_vs_linear"]["p"] > 0.05
    assert out["saturating"]["test_vs_linear"]["p"] > 0.05
    rejections = 0
    for i in range(100):
        x = rng.uniform(0, 1, 60)
        res = threshold_test(x, 0.3 + 0.5 * x + rng.normal(0, 0.1, 60), n_boot=199, seed=i)
        rejections += res["hinge"]["test_vs_linear"]["p"] <= 0.05
    print("empirical size at alpha 0.05 over 100 linear datasets:", rejections / 100)
    assert 0.01 <= rejections / 100 <= 0.12


def test_threshold_test_input_errors():
    with pytest.raises(ValueError, match="at least 6 points"):
        threshold_test(np.arange(5.0), np.arange(5.0))
    with pytest.raises(ValueError, match="3 distinct"):
        threshold_test(np.tile([0.0, 1.0], 5), np.arange(10.0))
    with pytest.raises(ValueError, match="NaN"):
        threshold_test(np.arange(10.0), np.where(np.arange(10) == 2, np.nan, 1.0))
