"""Model-based analyses of the study's results table: a crossed random-intercept linear mixed model
(`fit_crossed_lmm`) and a test of a threshold ("sufficiently shared") shape (`threshold_test`).

Why written here: no well-kept numpy/scipy-only library fits crossed random effects (statsmodels'
MixedLM takes crossed factors only as variance components inside one all-data group and is not a
dependency; lme4 is R). The fit follows lme4's profiled REML
(Bates et al. 2015, J. Stat. Softw. 67(1)) with every matrix small and dense: Z'WZ is q x q for
q random-effect levels, so a fit costs O(n q) once for the cross-products plus O(q^3) per criterion
evaluation, milliseconds for n ~ 4000 rows and q ~ 150 levels. Z itself and n x n matrices are never
formed densely.

Weights are precision weights (row i has residual variance sigma^2 / w_i, e.g. w_i = number of
trials behind a proportion); the REML residual degrees of freedom count rows, so duplicating a row
is not the same as giving it weight 2 (the fixed-theta fit is, the variance estimates are not).

Degrees of freedom ("containment" rule, as SAS's DDFM=CONTAIN in spirit): a fixed-effect column is
contained in factor g if it is constant within every level of g. Of the factors containing it, take
the one with the fewest levels; df = its number of levels minus the number of X columns contained in
it (intercept included). A column contained in no factor gets df = n - rank(X). So a between-mixture
slope is judged on mixtures, a within-mixture (between-model) slope on models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import linalg, optimize, sparse, stats
from scipy.linalg import lapack

_BOUNDARY_TOL = 1e-9  # REML units: a variance component is set to 0 if that costs no more than this


@dataclass(frozen=True)
class _Crossprods:
    """Weighted cross-products of [Z X y], random-effect levels ordered with the factor that has
    the most levels first (its block of Z'WZ is diagonal, so it is eliminated without a dense
    factorisation); everything the profiled criterion needs."""
    ZtWZ: np.ndarray      # q x q
    ZtWX: np.ndarray      # q x p
    XtWX: np.ndarray      # p x p
    ZtWy: np.ndarray      # q
    XtWy: np.ndarray      # p
    yWy: float
    factor_of_col: np.ndarray  # q: which factor each random-effect level belongs to
    n_first: int          # levels of the first (largest) factor
    n: int
    sum_log_w: float


def _validate(y: np.ndarray, X: np.ndarray, groups: Mapping[str, np.ndarray], names: Sequence[str],
              weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked float copies of y (n), X (n x p) and weights (n); raises ValueError on bad input."""
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    if y.ndim != 1 or X.ndim != 2:
        raise ValueError(f"y must be 1-d and X 2-d, got shapes {y.shape} and {X.shape}")
    n, p = X.shape
    if len(y) != n:
        raise ValueError(f"length mismatch: y has {len(y)} rows, X has {n}")
    if len(names) != p:
        raise ValueError(f"length mismatch: {len(names)} names for {p} columns of X")
    if not groups:
        raise ValueError("groups is empty: at least one random-intercept factor is needed")
    for g, labels in groups.items():
        if len(labels) != n:
            raise ValueError(f"length mismatch: group {g!r} has {len(labels)} labels, X has {n} rows")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"length mismatch: weights have shape {w.shape}, expected ({n},)")
    for label, arr in (("y", y), ("X", X), ("weights", w)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{label} contains NaN or inf")
    if np.any(w <= 0):
        raise ValueError("weights must be positive")
    if n <= p:
        raise ValueError(f"need more rows than fixed effects, got n={n}, p={p}")
    return y, X, w


def _check_rank(X: np.ndarray, names: Sequence[str]) -> int:
    """rank(X); ValueError naming the columns a pivoted QR finds dependent on the others."""
    _, R, piv = linalg.qr(X, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    rank = int(np.sum(diag > diag[0] * max(X.shape) * np.finfo(float).eps)) if diag[0] > 0 else 0
    if rank < X.shape[1]:
        dependent = [names[j] for j in piv[rank:]]
        raise ValueError(f"X is rank-deficient (rank {rank} < {X.shape[1]}); columns {dependent} are "
                         "linear combinations of the others")
    return rank


def _encode(groups: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, int]]:
    """(name, level index per row, number of levels) for each factor."""
    out = []
    for g, labels in groups.items():
        levels, idx = np.unique(np.asarray(labels), return_inverse=True)
        out.append((g, idx.ravel(), len(levels)))
    return out


def _crossprods(y: np.ndarray, X: np.ndarray, w: np.ndarray,
                codes: list[tuple[str, np.ndarray, int]]) -> _Crossprods:
    """Cross-products via a sparse n x q indicator Z (n * factors non-zeros); cost O(n (q + p^2))."""
    n = len(y)
    order = sorted(range(len(codes)), key=lambda g: -codes[g][2])
    sizes = [codes[g][2] for g in order]
    offsets = np.cumsum([0] + sizes)
    cols = np.concatenate([codes[g][1] + off for g, off in zip(order, offsets)])
    rows = np.tile(np.arange(n), len(codes))
    Z = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, offsets[-1]))
    ZtW = (Z.T @ sparse.diags(w)).tocsr()
    Xw = X * w[:, None]
    return _Crossprods(ZtWZ=(ZtW @ Z).toarray(), ZtWX=ZtW @ X, XtWX=X.T @ Xw, ZtWy=ZtW @ y,
                       XtWy=Xw.T @ y, yWy=float(y @ (w * y)),
                       factor_of_col=np.repeat(order, sizes), n_first=sizes[0],
                       n=n, sum_log_w=float(np.log(w).sum()))


def _tri_inv(T: np.ndarray, lower: bool) -> np.ndarray:
    """Inverse of a non-singular triangular matrix. Small triangular solves are done as products
    with this inverse: OpenBLAS's threaded trsm stalls ~10x on a busy machine, trtri and gemm do not."""
    inv, info = lapack.dtrtri(T, lower=int(lower))
    if info != 0:
        raise linalg.LinAlgError(f"singular triangular factor (dtrtri info {info})")
    return inv


class _BlockCholesky:
    """L with L L' = M = Lambda Z'WZ Lambda + I (q x q), as [[diag(d), 0], [C, Ls]]: the first
    factor's block of M is diagonal, so only the q - k rest needs a dense Cholesky
    (O((q-k)^3 + (q-k)^2 k))."""

    def __init__(self, A: np.ndarray, k: int):
        self.k = k
        self.d = np.sqrt(np.diag(A)[:k] + 1.0)
        self.C = A[k:, :k] / self.d
        rest = A[k:, k:] - self.C @ self.C.T
        rest[np.diag_indices_from(rest)] += 1.0
        self.Ls = linalg.cholesky(rest, lower=True) if len(rest) else rest
        self.Ls_inv = _tri_inv(self.Ls, lower=True) if len(rest) else rest

    def solve(self, v: np.ndarray) -> np.ndarray:
        """L^{-1} v for v of shape (q,) or (q, m)."""
        top = v[:self.k] / (self.d if v.ndim == 1 else self.d[:, None])
        if not len(self.Ls):
            return top
        return np.concatenate([top, self.Ls_inv @ (v[self.k:] - self.C @ top)])

    def logdet2(self) -> float:
        """log |L|^2 = log |M|."""
        return 2 * float(np.log(self.d).sum() + np.log(np.diag(self.Ls)).sum())


def _profile(cp: _Crossprods, theta: np.ndarray, gradient: bool = False) -> dict:
    """Penalised least squares at relative SDs theta (one per factor): beta, r^2, R_X, REML and,
    if asked, d REML / d theta (an extra q x q triangular solve)."""
    lam = theta[cp.factor_of_col]
    A = lam[:, None] * cp.ZtWZ * lam[None, :]
    L = _BlockCholesky(A, cp.n_first)
    cu = L.solve(lam * cp.ZtWy)
    RZX = L.solve(lam[:, None] * cp.ZtWX)
    RX = linalg.cholesky(cp.XtWX - RZX.T @ RZX, lower=False)  # Schur complement = R_X' R_X
    RX_inv = _tri_inv(RX, lower=False)
    cb = RX_inv.T @ (cp.XtWy - RZX.T @ cu)
    beta = RX_inv @ cb
    df_res = cp.n - len(beta)
    # r^2 by subtraction can round below 0 for an exact fit; the floor keeps the log finite
    r2 = max(cp.yWy - cu @ cu - cb @ cb, 1e-300)
    # -sum(log w) makes this the -2 log restricted likelihood; it does not depend on theta
    reml = (L.logdet2() + 2 * np.log(np.diag(RX)).sum()
            + df_res * (1 + np.log(2 * np.pi * r2 / df_res)) - cp.sum_log_w)
    out = {"beta": beta, "r2": r2, "RX_inv": RX_inv, "reml": float(reml)}
    if gradient:
        out["gradient"] = _gradient(cp, theta, L, lam, cu, RZX, RX_inv, beta, r2)
    return out


def _gradient(cp: _Crossprods, theta: np.ndarray, L: _BlockCholesky, lam: np.ndarray,
              cu: np.ndarray, RZX: np.ndarray, RX_inv: np.ndarray, beta: np.ndarray,
              r2: float) -> np.ndarray:
    """d REML / d theta_g = 2 theta_g [tr(Z_g' P Z_g) - (n - p) |Z_g' P y|^2 / r^2], P the REML
    projection (H^-1 - H^-1 X (X'H^-1X)^-1 X'H^-1, H = W^-1 + Z Lambda^2 Z'), all in q-space by
    Woodbury: Z'H^-1 Z = Z'WZ - G'G with G = L^-1 Lambda Z'WZ."""
    G = L.solve(lam[:, None] * cp.ZtWZ)
    ZHX = cp.ZtWX - G.T @ RZX
    diag_ZPZ = (np.diag(cp.ZtWZ) - (G ** 2).sum(axis=0)
                - ((RX_inv.T @ ZHX.T) ** 2).sum(axis=0))
    ZPy = cp.ZtWy - cp.ZtWX @ beta - G.T @ (cu - RZX @ beta)
    per_level = diag_ZPZ - (cp.n - len(beta)) * ZPy ** 2 / r2
    return 2 * theta * np.bincount(cp.factor_of_col, per_level, minlength=len(theta))


def _optimise(cp: _Crossprods, n_factors: int) -> tuple[np.ndarray, float, bool]:
    """Minimise REML over theta >= 0 by L-BFGS-B with the analytic gradient from two starts, then
    check each boundary theta_g = 0."""
    def crit(theta: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            fit = _profile(cp, np.asarray(theta, dtype=float), gradient=True)
        except linalg.LinAlgError:  # extreme theta can make the Schur complement lose definiteness
            return np.inf, np.zeros(n_factors)
        return fit["reml"], fit["gradient"]

    fits = [optimize.minimize(crit, np.full(n_factors, s), jac=True, method="L-BFGS-B",
                              bounds=[(0.0, None)] * n_factors,
                              options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 500})
            for s in (1.0, 0.2)]
    best = min(fits, key=lambda r: r.fun)
    theta, value = best.x, float(best.fun)
    # the criterion is flat (even in theta_g) at 0, so an optimiser stops near, not on, the boundary
    for g in range(n_factors):
        trial = theta.copy()
        trial[g] = 0.0
        trial_value = crit(trial)[0]
        if trial_value <= value + _BOUNDARY_TOL:
            theta, value = trial, min(value, trial_value)
    return theta, value, bool(np.isfinite(value) and any(r.success for r in fits))


def _containment_df(X: np.ndarray, names: Sequence[str], codes: list[tuple[str, np.ndarray, int]],
                    rank: int) -> list[int]:
    """Denominator df per column by the containment rule (module docstring); O(n p) per factor."""
    n, p = X.shape
    tol = 1e-9 * (1 + np.abs(X).max(axis=0))
    contained = {}
    for g, idx, k in codes:
        sums = np.zeros((k, p))
        np.add.at(sums, idx, X)
        means = sums / np.bincount(idx, minlength=k)[:, None]
        contained[g] = (np.abs(X - means[idx]).max(axis=0) <= tol, k)
    dfs = []
    for j in range(p):
        holders = [(k, mask) for mask, k in contained.values() if mask[j]]
        if holders:
            k, mask = min(holders, key=lambda h: h[0])
            dfs.append(int(k - mask.sum()))
        else:
            dfs.append(n - rank)
    bad = [names[j] for j in range(p) if dfs[j] < 1]
    if bad:
        raise ValueError(f"containment df < 1 for column(s) {bad}: their containing factor has no "
                         "more levels than the fixed effects it contains")
    return dfs


def fit_crossed_lmm(y: np.ndarray, X: np.ndarray, groups: Mapping[str, np.ndarray],
                    names: Sequence[str], weights: np.ndarray | None = None,
                    level: float = 0.95) -> dict:
    """REML fit of y = X beta + sum_g Z_g b_g + e, b_g ~ N(0, tau_g^2 I), e_i ~ N(0, sigma^2 / w_i).

    y: float[n]; X: float[n, p] with the intercept column supplied by the caller; groups: factor name
    -> labels[n] (crossed or nested); names: p column names; weights: precision weights[n].
    Returns a JSON-able dict: coef (estimate, se, containment df, t CI at `level`, two-sided p),
    variance (tau^2 per factor, residual sigma^2), n, levels, reml, converged, method.
    """
    y, X, w = _validate(y, X, groups, names, weights)
    rank = _check_rank(X, names)
    codes = _encode(groups)
    dfs = _containment_df(X, names, codes, rank)
    cp = _crossprods(y, X, w, codes)
    theta, reml, converged = _optimise(cp, len(codes))
    fit = _profile(cp, theta)
    n, p = X.shape
    sigma2 = fit["r2"] / (n - p)
    se = np.sqrt(sigma2 * (fit["RX_inv"] ** 2).sum(axis=1))  # diag of sigma^2 (R_X' R_X)^-1
    coef = {}
    for j, name in enumerate(names):
        est, df = float(fit["beta"][j]), dfs[j]
        half = float(stats.t.ppf((1 + level) / 2, df) * se[j])
        coef[name] = {"estimate": est, "se": float(se[j]), "df": df, "ci_low": est - half,
                      "ci_high": est + half, "p": float(2 * stats.t.sf(abs(est) / se[j], df))}
    variance = {g: float(sigma2 * theta[i] ** 2) for i, (g, _, _) in enumerate(codes)}
    variance["residual"] = float(sigma2)
    return {"coef": coef, "variance": variance, "n": n, "levels": {g: k for g, _, k in codes},
            "reml": reml, "converged": converged,
            "method": (f"Gaussian linear mixed model with crossed random intercepts for "
                       f"{', '.join(groups)}, fitted by profiled REML; {level:.0%} t intervals with "
                       "containment degrees of freedom.")}


def _line_fits(B: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of every column of Y (n x r) on [1, B[:, k]] for every basis column k (n x m).

    Returns rss, intercept, slope, each m x r; cost O(n m r), one matrix product.
    """
    Bc = B - B.mean(axis=0)
    Yc = Y - Y.mean(axis=0)
    sxx = (Bc ** 2).sum(axis=0)
    sxy = Bc.T @ Yc
    ok = sxx > 1e-12 * max(sxx.max(), np.finfo(float).tiny)  # a breakpoint past the data: flat basis
    slope = np.where(ok[:, None], sxy / np.where(ok, sxx, 1.0)[:, None], 0.0)
    rss = np.maximum((Yc ** 2).sum(axis=0)[None, :] - slope * sxy, 0.0)
    intercept = Y.mean(axis=0)[None, :] - slope * B.mean(axis=0)[:, None]
    return rss, intercept, slope


def _sup_f(rss_lin: np.ndarray, rss_alt: np.ndarray, floor: np.ndarray, n: int) -> np.ndarray:
    """sup over breakpoints of (RSS_lin - RSS(c)) / (RSS(c) / (n - 3)); rss_alt is grid x r.

    F falls as RSS(c) rises, so the sup is at the smallest RSS(c); the floor (relative to the total
    sum of squares) keeps an exact fit finite and JSON-able.
    """
    best = np.maximum(rss_alt.min(axis=0), floor)
    return (rss_lin - best) / (best / (n - 3))


def _aic(rss: float, n: int, k: int) -> float:
    """Gaussian AIC with k mean parameters plus sigma."""
    return float(n * (np.log(2 * np.pi * max(rss, 1e-300) / n) + 1) + 2 * (k + 1))


def threshold_test(x: np.ndarray, y: np.ndarray, quantiles: tuple[float, float] = (0.2, 0.8),
                   grid: int = 25, n_boot: int = 999, seed: int = 0) -> dict:
    """Linear vs hinge a + b max(0, x - c) vs saturating a + b min(x, c) fits of y on x (float[n]).

    c is searched on `grid` points between the given quantiles of x. Each of hinge and saturating is
    tested against linear by sup-F with a parametric bootstrap under the fitted linear model
    (Gaussian errors, n_boot resamples, all breakpoints x resamples in one product: O(n grid n_boot)).
    AIC counts c as a parameter. Returns a JSON-able dict.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of equal length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x or y contains NaN or inf")
    n = len(x)
    if n < 6:
        raise ValueError(f"need at least 6 points, got {n}")
    if len(np.unique(x)) < 3:
        raise ValueError("x needs at least 3 distinct values")
    cs = np.linspace(*np.quantile(x, quantiles), grid)
    bases = {"hinge": np.maximum(0.0, x[:, None] - cs), "saturating": np.minimum(x[:, None], cs)}

    def all_fits(Y: np.ndarray) -> dict:
        fits = {"linear": _line_fits(x[:, None], Y)}
        fits.update({m: _line_fits(B, Y) for m, B in bases.items()})
        return fits

    obs = all_fits(y[:, None])
    rss_lin, a_lin, b_lin = (v[0, 0] for v in obs["linear"])
    floor = 1e-12 * np.sum((y - y.mean()) ** 2)
    out = {"n": n, "breakpoint_range": [float(cs[0]), float(cs[-1])], "grid": grid,
           "n_boot": n_boot, "seed": seed,
           "linear": {"a": float(a_lin), "b": float(b_lin), "rss": float(rss_lin),
                      "aic": _aic(rss_lin, n, 2)}}
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(rss_lin / (n - 2))
    Y_star = (a_lin + b_lin * x)[:, None] + sigma * rng.standard_normal((n, n_boot))
    boot = all_fits(Y_star)
    floor_star = 1e-12 * np.sum((Y_star - Y_star.mean(axis=0)) ** 2, axis=0)
    for m in bases:
        rss, a, b = obs[m]
        k = int(np.argmin(rss[:, 0]))
        F = float(_sup_f(rss_lin, rss, floor, n)[0])
        F_star = _sup_f(boot["linear"][0][0], boot[m][0], floor_star, n)
        p = (1 + int(np.sum(F_star >= F))) / (1 + n_boot)
        out[m] = {"a": float(a[k, 0]), "b": float(b[k, 0]), "c": float(cs[k]),
                  "rss": float(rss[k, 0]), "aic": _aic(rss[k, 0], n, 3),
                  "test_vs_linear": {"F": F, "p": p, "mc_se": float(np.sqrt(p * (1 - p) / n_boot))}}
    out["preferred_by_aic"] = min(("linear", "hinge", "saturating"), key=lambda m: out[m]["aic"])
    return out
