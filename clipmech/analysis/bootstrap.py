"""Bootstrap primitives shared by the analyses and the study: one-level CIs, tail probabilities,
the fixed decision rule, Holm's correction and adaptive resampling.

Why a decision by tail probability and not by "the CI excludes 0": accuracy differences move in
steps of 1/(number of classes), so a percentile bound can sit exactly on 0 however many resamples
are drawn, and the verdict would flip with the bootstrap seed. The tail probability
p* = P*(stat* < 0) + 1/2 P*(stat* = 0) (mid-p for ties) is a smooth function of the resamples; with
its binomial Monte-Carlo standard error the rule can say when more resamples are needed
(`adaptive_bootstrap`) and when a result sits on the threshold whatever the seed ("borderline").
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
BORDERLINE = "inconclusive (borderline)"
INCONCLUSIVE = "inconclusive"


def bootstrap_ci(values: Sequence[float], statistic: Callable[..., float] = np.mean, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap CI of `statistic` over i.i.d. `values` (scipy.stats.bootstrap), the
    one-level CI of the toolkit. None when fewer than 2 finite values (no CI exists); NaNs are an
    error, not dropped silently. Cost O(n_boot * n)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"bootstrap_ci needs a 1-D array of values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"bootstrap_ci: {int((~np.isfinite(arr)).sum())} of {arr.size} values are not finite; "
                         "drop or impute them first (and say so)")
    if arr.size < 2:
        return None
    if np.ptp(arr) == 0:  # scipy warns on degenerate data; every resample equals the value
        v = float(statistic(arr))
        return v, v
    res = stats.bootstrap((arr,), statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
                          vectorized=statistic in (np.mean, np.median), rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def tail_probability(boots: np.ndarray) -> tuple[float, float]:
    """(p*, Monte-Carlo SE) with p* = P*(b < 0) + 1/2 P*(b = 0) over the finite resamples `boots`.

    p* is the bootstrap probability that the effect is not positive (mid-p for exact ties at 0);
    SE = sqrt(p*(1 - p*) / B), the binomial error of estimating it from B resamples.
    """
    b = np.asarray(boots, dtype=float)
    b = b[np.isfinite(b)]
    if b.size == 0:
        raise ValueError("tail_probability: no finite bootstrap resample")
    p = float((b < 0).mean() + 0.5 * (b == 0).mean())
    return p, math.sqrt(p * (1 - p) / b.size)


def decide(p: float, se: float, alpha: float = 0.05) -> str:
    """The fixed verdict rule for an effect whose expected (paper's) sign is positive.

    p = P*(effect <= 0) (mid-p, `tail_probability`), se its Monte-Carlo SE, q = 1 - p:
    *reproduced* when p + 2 se < alpha/2; *contradicted* when q + 2 se < alpha/2; *inconclusive
    (borderline)* when |p - alpha/2| <= 2 se or |q - alpha/2| <= 2 se (the resamples cannot tell
    which side of the threshold it is on); otherwise *inconclusive*.
    """
    half = alpha / 2
    q = 1.0 - p
    if p + 2 * se < half:
        return REPRODUCED
    if q + 2 * se < half:
        return CONTRADICTED
    if abs(p - half) <= 2 * se or abs(q - half) <= 2 * se:
        return BORDERLINE
    return INCONCLUSIVE


def holm(p: Sequence[float], se: Sequence[float] | None = None) -> tuple[list[float], list[float]]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1) and their Monte-Carlo SEs.

    The i-th smallest p is multiplied by (m - i + 1) and the running maximum taken; the SE of an
    adjusted value is the SE of the term that set it, times the same factor.
    """
    pa = np.asarray(p, dtype=float)
    sa = np.zeros_like(pa) if se is None else np.asarray(se, dtype=float)
    if pa.shape != sa.shape:
        raise ValueError(f"holm: {pa.size} p-values but {sa.size} standard errors")
    m = pa.size
    adj, adj_se = np.empty(m), np.empty(m)
    best, best_se = 0.0, 0.0
    for rank, i in enumerate(np.argsort(pa, kind="stable")):
        factor = m - rank
        if factor * pa[i] >= best:
            best, best_se = factor * pa[i], factor * sa[i]
        adj[i], adj_se[i] = min(best, 1.0), best_se
    return adj.tolist(), adj_se.tolist()


def clear_of(p: float, se: float, thresholds: Sequence[float]) -> bool:
    """Whether p and 1 - p are each more than 2 se away from every threshold."""
    return all(abs(x - t) > 2 * se for t in thresholds for x in (p, 1.0 - p))


def adaptive_bootstrap(draw: Callable[[np.random.Generator, int], np.ndarray], n_boot: int = 2000,
                       max_boot: int = 64000, alpha: float = 0.05, n_tests: int = 1,
                       seed: int = 0) -> np.ndarray:
    """Bootstrap statistics drawn until the decision is clear of every threshold it can face.

    `draw(rng, B)` returns B resampled statistics (NaN for a resample where the statistic is
    undefined). Starts with `n_boot` and doubles the total while p* or 1 - p* lies within 2 Monte-Carlo
    SEs of alpha/(2k) for some k = 1..n_tests (the thresholds Holm's correction over n_tests can use),
    up to `max_boot` resamples. Returns every drawn statistic. Cost: O(final B) draws.
    """
    if n_boot < 1 or max_boot < n_boot:
        raise ValueError(f"need 1 <= n_boot <= max_boot, got n_boot={n_boot}, max_boot={max_boot}")
    rng = np.random.default_rng(seed)
    thresholds = [alpha / (2 * k) for k in range(1, n_tests + 1)]
    boots = np.asarray(draw(rng, n_boot), dtype=float)
    while boots.size < max_boot:
        finite = boots[np.isfinite(boots)]
        if finite.size and clear_of(*tail_probability(finite), thresholds):
            break
        boots = np.concatenate([boots, np.asarray(draw(rng, min(boots.size, max_boot - boots.size)), dtype=float)])
    return boots


def percentile_ci(boots: np.ndarray, level: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """(low, high) percentile interval of the finite resamples, (None, None) when there are none."""
    b = np.asarray(boots, dtype=float)
    b = b[np.isfinite(b)]
    if b.size == 0:
        return None, None
    lo, hi = np.quantile(b, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def decide_holm(p: float, se: float, p_adj: float, se_adj: float, alpha: float = 0.05) -> str:
    """The `decide` rule for one test of a Holm family: *reproduced* needs the adjusted p
    (p_adj + 2 se_adj < alpha/2); *contradicted* is read from the raw opposite tail (a claim that
    any test suffices is contradicted only when every test is, which needs no correction);
    *borderline* when either the adjusted p or the raw decision sits within 2 SE of its threshold."""
    if p_adj + 2 * se_adj < alpha / 2:
        return REPRODUCED
    raw = decide(p, se, alpha)
    if raw == CONTRADICTED:
        return CONTRADICTED
    if raw == BORDERLINE or abs(p_adj - alpha / 2) <= 2 * se_adj:
        return BORDERLINE
    return INCONCLUSIVE
