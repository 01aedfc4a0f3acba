"""CKA: agreement with the textbook formulas, invariances, streaming grids, domain CKA, errors."""
import numpy as np
import pytest
import torch

from clipmech.analysis.cka import MinibatchCKA, cka, domain_cka, pair_rows


def _direct_gram(X, kernel):
    X = np.asarray(X, dtype=np.float64)
    if kernel == "linear":
        return X @ X.T
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    iu = np.triu_indices(len(X), 1)
    d = D[iu]
    sigma2 = np.median(d[d > 0])
    return np.exp(-D / (2 * sigma2))


def _direct_hsic(K, L, estimator):
    n = len(K)
    if estimator == "biased":
        H = np.eye(n) - np.ones((n, n)) / n
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 * one @ Kt @ Lt @ one / (n - 2)) / (n * (n - 3))


def _direct_cka(X, Y, kernel, estimator):
    K, L = _direct_gram(X, kernel), _direct_gram(Y, kernel)
    return _direct_hsic(K, L, estimator) / np.sqrt(_direct_hsic(K, K, estimator) * _direct_hsic(L, L, estimator))


@pytest.fixture
def xy():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 12))
    Y = X @ rng.normal(size=(12, 7)) + 0.8 * rng.normal(size=(40, 7))
    return X, Y


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_matches_direct_formula(xy, kernel, estimator):
    X, Y = xy
    expected = _direct_cka(X, Y, kernel, estimator)
    assert 0.2 < expected < 1
    assert cka(X, Y, kernel, estimator) == pytest.approx(expected, rel=1e-10)
    # torch input (float32) is promoted to float64 and gives the same answer up to float32 input rounding
    assert cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y), kernel, estimator) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_linear_feature_form_equals_gram_form(xy, estimator):
    X, Y = xy
    X = X + 5.0  # an offset must not matter (HSIC is translation invariant) nor hurt precision
    g = cka(X, Y, estimator=estimator, form="gram")
    f = cka(X, Y, estimator=estimator, form="feature")
    assert f == pytest.approx(g, rel=1e-10)
    assert f == pytest.approx(_direct_cka(X, Y, "linear", estimator), rel=1e-10)


def test_rbf_fixed_sigma_matches_direct(xy):
    X, Y = xy
    K = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / (2 * 3.0 ** 2))
    L = np.exp(-((Y[:, None] - Y[None]) ** 2).sum(-1) / (2 * 3.0 ** 2))
    exp = _direct_hsic(K, L, "unbiased") / np.sqrt(_direct_hsic(K, K, "unbiased") * _direct_hsic(L, L, "unbiased"))
    assert cka(X, Y, "rbf", sigma=3.0) == pytest.approx(exp, rel=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_invariances_and_self_similarity(xy, kernel, estimator):
    X, Y = xy
    Q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 12)))
    base = cka(X, Y, kernel, estimator)
    assert cka(X @ Q, Y, kernel, estimator) == pytest.approx(base, rel=1e-9)
    assert cka(3.7 * X, 0.01 * Y, kernel, estimator) == pytest.approx(base, rel=1e-9)
    assert cka(X, X, kernel, estimator) == pytest.approx(1.0, abs=1e-12)


def test_unbiased_near_zero_for_independent_data_where_biased_is_not():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(200, 300)), rng.normal(size=(200, 300))
    assert abs(cka(X, Y, estimator="unbiased")) < 0.02
    assert cka(X, Y, estimator="biased") > 0.3  # the known small-n / large-d inflation of biased CKA


def test_minibatch_grid_converges_to_full():
    rng = np.random.default_rng(4)
    n = 1024
    Z = rng.normal(size=(n, 6))
    xs = [Z @ rng.normal(size=(6, 10)) + s * rng.normal(size=(n, 10)) for s in (0.1, 1.0, 3.0)]
    ys = [Z[:, :3] @ rng.normal(size=(3, 8)) + 0.5 * rng.normal(size=(n, 8)), rng.normal(size=(n, 5))]
    acc = MinibatchCKA()
    for s in range(0, n, 128):
        acc.update([x[s:s + 128] for x in xs], [y[s:s + 128] for y in ys])
    grid = acc.compute()
    full = np.array([[cka(x, y) for y in ys] for x in xs])
    assert grid.shape == (3, 2) and acc.n_examples == n and acc.n_batches == 8
    np.testing.assert_allclose(grid, full, atol=0.03)
    # exact per-batch identity: one batch = the full-data estimate (both estimators, both kernels)
    for kernel in ("linear", "rbf"):
        for est in ("unbiased", "biased"):
            one = MinibatchCKA(kernel, est)
            one.update([x[:64] for x in xs], [y[:64] for y in ys])
            exact = [[cka(x[:64], y[:64], kernel, est) for y in ys] for x in xs]
            np.testing.assert_allclose(one.compute(), exact, rtol=1e-10, atol=1e-12)


def test_minibatch_self_grid_has_unit_diagonal():
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(32, 4)), rng.normal(size=(32, 9))]
    acc = MinibatchCKA()
    acc.update(xs)
    np.testing.assert_allclose(np.diag(acc.compute()), 1.0)


def test_errors_are_explicit_never_nan():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="at least 4 examples"):
        cka(X[:3], X[:3])
    with pytest.raises(ValueError, match="constant representation"):
        cka(np.ones((10, 3)), X)
    with pytest.raises(ValueError, match="constant representation"):
        cka(X, np.tile(X[:1], (10, 1)), kernel="rbf")
    with pytest.raises(ValueError, match="same number of rows"):
        cka(X, X[:9])
    with pytest.raises(ValueError, match="non-finite"):
        cka(np.where(np.eye(10, 3) > 0, np.nan, X), X)
    with pytest.raises(ValueError, match="unknown kernel 'cosine'"):
        cka(X, X, kernel="cosine")
    with pytest.raises(ValueError, match="sigma must be a positive"):
        cka(X, X, kernel="rbf", sigma=-1.0)
    # mutually orthogonal rows: the off-diagonal Gram is zero, so the unbiased self-HSIC is exactly 0
    with pytest.raises(ValueError, match="self-HSIC of X is .*not positive"):
        cka(np.eye(6), X[:6])
    assert cka(np.eye(6), X[:6], estimator="biased") == pytest.approx(_direct_cka(np.eye(6), X[:6], "linear", "biased"))
    acc = MinibatchCKA()
    with pytest.raises(ValueError, match="drop_last"):
        acc.update([X[:3]], [X[:3]])
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    acc.update([np.ones((8, 2))], [X[:8]])
    with pytest.raises(ValueError, match="non-positive accumulated self-HSIC"):
        acc.compute()


def _toy_domains(n_classes=12, per=2, seed=0):
    """Two 'domains' sharing class structure (d1 = rotated d0 + noise) and one unrelated domain."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, 16))
    Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    feats, cls, dom = [], [], []
    for d in range(3):
        for k in range(n_classes):
            for _ in range(per):
                base = centers[k] if d == 0 else centers[k] @ Q if d == 1 else rng.normal(size=16)
                feats.append(base + 0.1 * rng.normal(size=16))
                cls.append(k)
                dom.append(d)
    return np.array(feats), np.array(cls), np.array(dom)


def test_domain_cka_centroid_and_image_modes():
    F, cls, dom = _toy_domains()
    subsets = {"all": list(range(12)), "C2": [0, 1, 2, 3, 4]}
    out = domain_cka({"p0": F, "p1": F * 2}, cls, dom, ["real", "clip", "noise"], subsets,
                     n_boot=50, n_perm=50, seed=0, min_rows=5)
    r = out["results"]["all"]["linear"]
    assert set(r) == {"real|clip", "real|noise", "clip|noise"}
    shared, unrelated = r["real|clip"], r["real|noise"]
    assert shared["cka"][0] > 0.95 and abs(unrelated["cka"][0]) < 0.4
    assert shared["ci_low"][0] <= shared["cka"][0] <= shared["ci_high"][0] + 1e-12
    assert shared["perm_p95"][0] < 0.5 < shared["cka"][0]
    assert shared["n_rows"] == 12 and shared["cka"][0] == pytest.approx(shared["cka"][1])
    # centroid rows equal class means: matches cka on explicitly computed centroids
    cen = lambda d: np.stack([F[(cls == k) & (dom == d)].mean(0) for k in range(12)])  # noqa: E731
    assert shared["cka"][0] == pytest.approx(cka(cen(0), cen(1)), rel=1e-10)
    assert out["results"]["all"]["rbf"]["real|clip"]["cka"][0] == pytest.approx(cka(cen(0), cen(1), "rbf"), rel=1e-10)
    assert out["results"]["C2"]["linear"]["real|clip"]["n_rows"] == 5
    img = domain_cka({"p0": F}, cls, dom, ["real", "clip", "noise"], subsets, mode="image", n_boot=20, n_perm=10)
    assert img["results"]["all"]["linear"]["real|clip"]["n_rows"] == 24
    assert img["mode"] == "image" and img["results"]["all"]["linear"]["real|clip"]["cka"][0] > 0.9


def test_domain_cka_skips_and_reports_tiny_subsets():
    F, cls, dom = _toy_domains()
    out = domain_cka({"p": F}, cls, dom, ["a", "b", "c"], {"tiny": [0, 1, 2]}, n_boot=5, n_perm=5)
    assert out["results"]["tiny"]["linear"] == {}
    assert len(out["skipped"]) == 3 and "need >= 8 rows" in out["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="same images"):
        domain_cka({"p": F[:-1]}, cls, dom, ["a", "b", "c"], {"all": list(range(12))})


def test_pair_rows_rule():
    cls = np.array([0, 0, 1, 0, 1, 1, 0])
    dom = np.array([0, 0, 0, 1, 1, 1, 1])
    ra, rb, rc = pair_rows(cls, dom, 0, 1, [0, 1])
    np.testing.assert_array_equal(ra, [0, 1, 2])
    np.testing.assert_array_equal(rb, [3, 6, 4])
    np.testing.assert_array_equal(rc, [0, 0, 1])


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_count_weighted_resamples_equal_cka_on_each_gathered_resample(kernel, estimator):
    """Bootstrap draws (with repeated rows, and of different sizes) and permutations, computed from
    row counts over the original kernel, match `cka` on the explicitly gathered rows."""
    from clipmech.analysis.cka import _bootstrap_cka, _kernel_source, _permutation_cka
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    draws = [torch.randint(0, 12, (12,), generator=g) for _ in range(5)] + [torch.tensor([0, 0, 1, 2, 2, 2, 5, 7])]
    counts = torch.stack([torch.bincount(d, minlength=12) for d in draws]).double()
    assert (counts > 1).any()  # the case that matters: repeated rows
    got = _bootstrap_cka(_kernel_source(X, kernel), _kernel_source(Y, kernel), counts, kernel, estimator)
    want = [cka(X[d], Y[d], kernel, estimator, form="gram") for d in draws]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    perms = torch.stack([torch.randperm(12, generator=g) for _ in range(4)])
    got = _permutation_cka(_kernel_source(X, kernel), _kernel_source(Y, kernel), perms, kernel, estimator)
    want = [cka(X, Y[p], kernel, estimator, form="gram") for p in perms]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_bootstrap_resample_too_small_or_without_bandwidth_is_nan_not_error():
    from clipmech.analysis.cka import _bootstrap_cka, _kernel_source
    X = torch.randn(6, 3, dtype=torch.float64)
    counts = torch.tensor([[3.0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    got = _bootstrap_cka(_kernel_source(X, "rbf"), _kernel_source(X, "rbf"), counts, "rbf", "unbiased")
    assert np.isnan(got[:2]).all() and got[2] == pytest.approx(1.0)


def test_minibatch_float32_and_nonfinite_layer_named():
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(64, 4))
    xs = [Z @ rng.normal(size=(4, 6)) + 0.3 * rng.normal(size=(64, 6)) + 50.0, rng.normal(size=(64, 3))]
    ys = [Z @ rng.normal(size=(4, 5)) + 0.3 * rng.normal(size=(64, 5))]
    exact = MinibatchCKA()
    exact.update(xs, ys)
    fast = MinibatchCKA(dtype=torch.float32)
    fast.update(xs, ys)
    assert fast.cross.dtype == torch.float64  # float32 Grams, float64 accumulators
    np.testing.assert_allclose(fast.compute(), exact.compute(), atol=1e-4)
    assert not np.allclose(fast.compute(), exact.compute(), rtol=0, atol=1e-12)  # really ran in float32
    with pytest.raises(ValueError, match="dtype must be"):
        MinibatchCKA(dtype=torch.float16)
    bad = [xs[0], np.where(np.eye(64, 3) > 0, np.inf, xs[1])]
    acc = MinibatchCKA(x_names=["a", "b"])
    with pytest.raises(ValueError, match=r"xs layers \['b'\] have non-finite"):
        acc.update(bad, ys)
    assert acc.n_batches == 0 and acc.cross is None  # nothing accumulated from the bad batch


def test_minibatch_float64_keeps_digits_under_a_dominant_mean():
    # column means 1e4 x the spread: the raw Gram would lose ~8 digits; the grid must still match the
    # exact (feature-centred) estimate, and an offset below the threshold must not change the answer
    rng = np.random.default_rng(8)
    Z = rng.normal(size=(40, 3))
    x = Z @ rng.normal(size=(3, 7)) + 0.5 * rng.normal(size=(40, 7))
    y = Z @ rng.normal(size=(3, 4)) + 0.5 * rng.normal(size=(40, 4))
    exact = cka(x, y)
    for offset in (0.0, 3.0, 1e4):
        acc = MinibatchCKA()
        acc.update([x + offset], [y - offset])
        np.testing.assert_allclose(acc.compute(), [[exact]], rtol=1e-11)
