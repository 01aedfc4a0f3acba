"""How reliable is each sharedness measure across the study's rows (issue 26)?

A measure that varies between rows mostly by estimation noise cannot correlate with accuracy however
strong the true link is. Per measure, over the rows (trained model x test domain) where it is judged:

    reliability = 1 - mean(SE^2) / Var(score)

with SE each row's standard error from the within-model class bootstrap (`class_bootstrap_se`:
the score is a mean over classes, so resampling classes gives its noise) and Var the sample variance
of the scores over rows (the classical true-score share of the observed variance). A measure below
RELIABILITY_MIN is flagged where it is judged. Correlations are also reported corrected for
attenuation: r / sqrt(rel_x rel_y) (`disattenuated`; accuracy's own reliability may be passed, 1
otherwise), which can exceed 1 when the reliabilities are underestimated: it is a reading aid, not a
verdict.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

RELIABILITY_MIN = 0.5


def class_bootstrap_se(per_class: Sequence[float], n_boot: int = 2000, seed: int = 0) -> float | None:
    """Standard error of the mean of one row's per-class values from resampling the classes with
    replacement (`n_boot` resamples, fixed seed); None with fewer than 2 finite values. Cost O(n_boot C)."""
    v = np.asarray([x for x in per_class if x is not None and np.isfinite(x)], dtype=float)
    if v.size < 2:
        return None
    rng = np.random.default_rng(seed)
    return float(v[rng.integers(0, v.size, (n_boot, v.size))].mean(1).std(ddof=1))


def row_score_se(row: Mapping[str, Any], measure: str) -> float | None:
    """`class_bootstrap_se` of one results row's `measure` from its per-class scores
    (`controls.nulls[measure].score.per_class`); None when the row has none."""
    per = ((((row.get("controls") or {}).get("nulls") or {}).get(measure) or {}).get("score") or {}).get("per_class")
    return class_bootstrap_se(per) if per else None


def reliability(scores: Sequence[float], ses: Sequence[float], minimum: float = RELIABILITY_MIN) -> dict[str, Any]:
    """{"reliability", "n", "var", "mean_se2", "flagged", "reason"} of one measure over rows: 1 -
    mean(SE^2) / Var(scores) (Var with ddof 1). Rows with a missing score or SE are dropped and
    counted in "n_dropped". reliability None (with a reason) with fewer than 3 rows or no variance;
    it is negative when the noise exceeds the observed spread. flagged: reliability < `minimum`."""
    pairs = [(s, e) for s, e in zip(scores, ses) if s is not None and e is not None and np.isfinite(s) and np.isfinite(e)]
    out: dict[str, Any] = {"n": len(pairs), "n_dropped": len(scores) - len(pairs), "minimum": minimum}
    if len(pairs) < 3:
        return out | {"reliability": None, "flagged": True, "reason": f"{len(pairs)} rows with a score and SE; need 3"}
    s, e = np.array(pairs, dtype=float).T
    var = float(s.var(ddof=1))
    out |= {"var": var, "mean_se2": float(np.mean(e ** 2))}
    if var == 0:
        return out | {"reliability": None, "flagged": True, "reason": "the score does not vary across rows"}
    rel = 1.0 - out["mean_se2"] / var
    return out | {"reliability": rel, "flagged": bool(rel < minimum), "reason": None}


def disattenuated(r: float | None, rel_x: float | None, rel_y: float | None = 1.0) -> float | None:
    """r / sqrt(rel_x rel_y): the correlation corrected for attenuation by measurement noise; None
    when r is missing or a reliability is missing or not positive (no correction is defined)."""
    if r is None or rel_x is None or rel_y is None or rel_x <= 0 or rel_y <= 0:
        return None
    return float(r / np.sqrt(rel_x * rel_y))
