"""The statistics of the domain-interpolation study, under `plans/interpolation-v1.toml`.

Input: the study's rows (one per trained model on the test domain; `added` lists the domains added to
CG-low, None for the endpoints). Everything here is numpy on stored numbers, so `results.json` can be
recomputed without a model. The bootstrap is crossed: every resample draws the seeds (the unit of
replication: one seed = one trained model per mixture) and, for accuracy, the C2 classes with
replacement, both shared by all mixtures, so a mixture's models are never counted twice.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from clipmech.analysis.bootstrap import REPRODUCED, decide, holm, percentile_ci, tail_probability
from clipmech.study.analysis_plan import shipped_plan
from clipmech.study.measure_reliability import reliability, row_score_se
from clipmech.study.mixed_model import fit_crossed_lmm, threshold_test
from clipmech.study.stats import _multinomial

PLAN_FILE = "interpolation-v1.toml"


def load_interpolation_plan() -> dict[str, Any]:
    """The shipped interpolation plan (dict) with its "sha256" (first 16 hex of the file's bytes)."""
    data, sha = shipped_plan(PLAN_FILE)
    return data | {"sha256": sha, "file": PLAN_FILE}


# ------------------------------------------------------------------------------------ tables
class Design:
    """The factorial part of the rows as arrays: mixtures (labels, added-domain indicators [M, K],
    number added [M]), seeds, C2 classes, accuracy per (mixture, seed, class) [M, S, C] and each
    measure per (mixture, seed) [M, S]; NaN where a model is missing."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], domains: Sequence[str], measures: Sequence[str],
                 metric: str = "c2_test_acc"):
        fact = [r for r in rows if r.get("added") is not None]
        if not fact:
            raise ValueError("no interpolation mixtures among the rows (every row has added = None)")
        self.labels = list(dict.fromkeys(r["setup"] for r in fact))
        self.seeds = sorted({int(r["seed"]) for r in fact})
        per = [r.get(f"{metric}_per_class") or {} for r in fact]
        self.classes = sorted(set.intersection(*(set(p) for p in per))) if all(per) else []
        if not self.classes:
            raise ValueError(f"rows lack {metric}_per_class for a common set of classes; the class bootstrap needs it")
        self.domains = list(domains)
        added = {r["setup"]: set(r["added"]) for r in fact}
        self.inclusion = np.array([[d in added[m] for d in self.domains] for m in self.labels], dtype=float)
        self.n_added = self.inclusion.sum(1)
        # added domains whose effect the design can estimate: added in some mixtures, not in all
        # (a paper-scale list of mixtures need not vary every domain)
        self.varied = [j for j in range(len(self.domains)) if 0 < self.inclusion[:, j].sum() < len(self.labels)]
        M, S, C = len(self.labels), len(self.seeds), len(self.classes)
        self.acc = np.full((M, S, C), np.nan)
        self.measures = {k: np.full((M, S), np.nan) for k in measures}
        self.rows: dict[tuple[int, int], Mapping[str, Any]] = {}
        # why a measure is null, as the rows say (e.g. too few C2 rows for CKA)
        self.null_reasons = {k: next((r["null_reasons"][k] for r in fact if (r.get("null_reasons") or {}).get(k)),
                                     "no reason recorded") for k in measures}
        for r, p in zip(fact, per):
            i, j = self.labels.index(r["setup"]), self.seeds.index(int(r["seed"]))
            self.acc[i, j] = [p[c] for c in self.classes]
            self.rows[(i, j)] = r
            for k in measures:
                self.measures[k][i, j] = np.nan if r.get(k) is None else float(r[k])


def _mixture_means(values: np.ndarray, seed_w: np.ndarray, class_w: np.ndarray | None) -> np.ndarray:
    """[B, M] mixture means under resampling weights: values [M, S] or [M, S, C], seed_w [B, S],
    class_w [B, C] (None for per-model values). Missing models (NaN) drop out of their mixture."""
    if class_w is None:
        per_model = values[None]
    else:
        per_model = np.einsum("msc,bc->bms", np.nan_to_num(values), class_w) / class_w.sum(1)[:, None, None]
    present = ~np.isnan(values if values.ndim == 2 else values[..., 0])
    w = seed_w[:, None, :] * present[None]
    return (np.nan_to_num(per_model) * w).sum(2) / np.maximum(w.sum(2), 1e-300)


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y [B, M] on x [M], per row."""
    xc = x - x.mean()
    return (y - y.mean(1, keepdims=True)) @ xc / (xc @ xc)


def _effects(design: Design, means: np.ndarray) -> dict[str, np.ndarray]:
    """The dose statistics of mixture means [B, M]: slope on the number added, mean per number added,
    and each domain's main effect (mean with minus mean without)."""
    out = {"slope": _slope(design.n_added, means)}
    for k in np.unique(design.n_added):
        out[f"k{int(k)}"] = means[:, design.n_added == k].mean(1)
    for j in design.varied:
        on = design.inclusion[:, j] == 1
        out[f"adds_{design.domains[j]}"] = means[:, on].mean(1) - means[:, ~on].mean(1)
    return out


def _summarise(point: float, boots: np.ndarray, alpha: float) -> dict[str, Any]:
    lo, hi = percentile_ci(boots[np.isfinite(boots)], 1 - alpha)
    p, se = tail_probability(boots)
    return {"estimate": float(point), "ci_low": lo, "ci_high": hi, "p_star": p, "p_star_se": se,
            "n_boot": int(boots.size), "verdict": decide(p, se, alpha)}


def dose_response(design: Design, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Per quantity (accuracy, each measure): the slope of mixture means against the number of added
    domains, the mean per number added and each added domain's main effect, with 95 % crossed-bootstrap
    CIs and p* = P*(effect <= 0); domain effects also Holm-adjusted (two-sided). Cost O(B M S C)."""
    rng = np.random.default_rng(seed)
    S, C = len(design.seeds), len(design.classes)
    seed_w, class_w = _multinomial(rng, S, n_boot), _multinomial(rng, C, n_boot)
    ones_s, ones_c = np.ones((1, S)), np.ones((1, C))
    out = {}
    for name, values, per_class in [("accuracy", design.acc, True),
                                    *((k, v, False) for k, v in design.measures.items())]:
        if np.isnan(values).all():
            out[name] = {"reason": f"no model has this measure: {design.null_reasons.get(name)}"}
            continue
        point = _effects(design, _mixture_means(values, ones_s, ones_c if per_class else None))
        boots = _effects(design, _mixture_means(values, seed_w, class_w if per_class else None))
        stats = {k: _summarise(point[k][0], boots[k], alpha) for k in point}
        stats |= {f"adds_{d}": {"reason": "added in every mixture or in none: no effect to estimate"}
                  for j, d in enumerate(design.domains) if j not in design.varied}
        domains = [f"adds_{design.domains[j]}" for j in design.varied]
        two_sided = [min(1.0, 2 * min(stats[k]["p_star"], 1 - stats[k]["p_star"])) for k in domains]
        for k, adj in zip(domains, holm(two_sided)[0]):
            stats[k]["p_holm_two_sided"] = adj
        out[name] = stats
    return out


# ------------------------------------------------------------------------------------ mixed model
def mixed_models(design: Design, alpha: float = 0.05, drawings: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per measure, the plan's linear mixed model of C2 proportion correct per (model, class), each
    weighted by the class's drawings (`drawings`; None: equal weights): fixed intercept, between
    (mixture mean) and within (deviation) in SD units of the measure, one indicator per added domain;
    random intercepts for mixture, seed, class and model. Adds one-sided p's for between > 0 (and < 0),
    Holm over the measures. A model that cannot be fitted is kept with its reason."""
    out: dict[str, Any] = {}
    M, S, C = design.acc.shape
    per_class = np.array([1.0 if drawings is None else float(drawings[c]) for c in design.classes])
    weights = np.broadcast_to(per_class, (M, S, C))
    mix, sd, cl = np.meshgrid(np.arange(M), np.arange(S), np.arange(C), indexing="ij")
    for name, values in design.measures.items():
        ok = ~np.isnan(values)[..., None] & ~np.isnan(design.acc)
        if ok.sum() == 0:
            out[name] = {"reason": f"no model has this measure: {design.null_reasons[name]}"}
            continue
        if np.nanstd(values) == 0:
            out[name] = {"reason": "the measure does not vary across models"}
            continue
        scale = float(np.nanstd(values, ddof=1))
        between = np.nanmean(values, axis=1, keepdims=True)
        within = values - between
        cols = {"intercept": np.ones_like(values), "between": np.broadcast_to(between, values.shape) / scale,
                "within": within / scale}
        cols |= {f"adds_{design.domains[j]}": np.broadcast_to(design.inclusion[:, [j]], values.shape)
                 for j in design.varied}
        X = np.stack([np.broadcast_to(c[..., None], (M, S, C))[ok] for c in cols.values()], axis=1)
        groups = {"mixture": mix[ok], "seed": sd[ok], "class": cl[ok], "model": (mix * S + sd)[ok]}
        try:
            fit = fit_crossed_lmm(design.acc[ok], X, groups, list(cols), weights=weights[ok], level=1 - alpha)
        except ValueError as err:
            out[name] = {"reason": str(err)}
            continue
        fit["measure_sd"] = scale
        fit["reliability"] = _reliabilities(design, name, within)
        out[name] = fit
    fitted = [k for k, v in out.items() if "coef" in v]
    for side in ("positive", "negative"):
        ps = [_one_sided(out[k]["coef"]["between"], side) for k in fitted]
        for k, p, adj in zip(fitted, ps, holm(ps)[0] if ps else []):
            out[k]["coef"]["between"][f"p_{side}"] = p
            out[k]["coef"]["between"][f"p_{side}_holm"] = adj
    return out


def _one_sided(coef: Mapping[str, float], side: str) -> float:
    """One-sided p of a coefficient from its two-sided t p-value."""
    half = coef["p"] / 2
    positive = coef["estimate"] > 0
    return half if positive == (side == "positive") else 1 - half


def _reliabilities(design: Design, measure: str, within: np.ndarray) -> dict[str, Any]:
    """The measure's reliability over the models and that of its within-mixture deviation (1 - mean
    class-bootstrap SE^2 / variance, `measure_reliability.reliability`): the within coefficient is
    attenuated by about the latter."""
    rows = design.rows
    ses = [row_score_se(row, measure) for row in rows.values()]
    devs = [None if np.isnan(within[i, j]) else float(within[i, j]) for i, j in rows]
    return {"over_models": reliability([row.get(measure) for row in rows.values()], ses),
            "within_mixture": reliability(devs, ses)}


# ------------------------------------------------------------------------------------ threshold
def thresholds(rows: Sequence[Mapping[str, Any]], measures: Sequence[str], plan: Mapping[str, Any],
               metric: str = "c2_test_acc") -> dict[str, Any]:
    """Per measure, `mixed_model.threshold_test` of C2 accuracy against the measure over every model
    of the study (endpoints included), Holm over the measures for the hinge and saturating p's."""
    out: dict[str, Any] = {}
    cfg = plan["threshold"]
    for k in measures:
        pts = [(r[k], r[metric]) for r in rows if r.get(k) is not None and r.get(metric) is not None]
        if not pts:
            out[k] = {"reason": "no model has this measure"}
            continue
        try:
            x, y = np.array(pts, dtype=float).T
            out[k] = threshold_test(x, y, quantiles=tuple(cfg["quantiles"]), grid=cfg["grid"],
                                    n_boot=cfg["n_boot"], seed=plan["boot_seed"])
        except ValueError as err:
            out[k] = {"reason": str(err)}
    done = [k for k in measures if "reason" not in out[k]]
    for test in ("hinge", "saturating"):
        tests = [out[k][test]["test_vs_linear"] for k in done]
        for t, adj in zip(tests, holm([t["p"] for t in tests])[0] if tests else []):
            t["p_holm"] = adj
    return out


# ------------------------------------------------------------------------------------ verdict
def verdict(dose: Mapping[str, Any], mixed: Mapping[str, Any], measures: Sequence[str], alpha: float
            ) -> dict[str, Any]:
    """Finding 3 from this design by the plan's rule "dose_and_between" (see the plan file)."""
    slope = dose.get("accuracy", {}).get("slope")
    dose_ok = slope is not None and slope["verdict"] == REPRODUCED
    between = {k: mixed[k]["coef"]["between"] for k in measures if "coef" in mixed.get(k, {})}
    pos = [k for k, c in between.items() if c["p_positive_holm"] < alpha / 2]
    neg = [k for k, c in between.items() if c["p_negative_holm"] < alpha / 2]
    missing = [k for k in measures if k not in between]
    if neg:
        word = "contradicted"
    elif dose_ok and len(pos) == len(measures):
        word = "holds"
    elif dose_ok and pos:
        word = "partly"
    else:
        word = "not shown"
    dose_text = "no slope" if slope is None else (
        f"C2 accuracy {'rises' if dose_ok else 'does not rise detectably'} with added domains "
        f"({slope['verdict']}: slope {100 * slope['estimate']:+.1f} points per domain, 95 % CI "
        f"[{100 * slope['ci_low']:+.1f}, {100 * slope['ci_high']:+.1f}])")
    link = (f"between-mixture coefficient > 0 after Holm for {len(pos)} of {len(measures)} measures"
            + (f" ({', '.join(pos)})" if pos else "") + (f"; < 0 for {', '.join(neg)}" if neg else "")
            + (f"; not fitted: {', '.join(missing)}" if missing else ""))
    return {"verdict": word, "dose_ok": dose_ok, "positive": pos, "negative": neg, "not_fitted": missing,
            "text": f"{dose_text}; {link}."}


def build_interpolation_results(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                                skipped: Sequence[Mapping[str, str]], provenance: Mapping[str, Any] | None = None,
                                n_boot: int | None = None, boot_seed: int | None = None) -> dict[str, Any]:
    """The study's results.json object: config, plan (file and hash), rows, skipped levels, dose
    response, mixed models, threshold tests and the verdict. Cost: seconds (2,000 resamples, 4 fits,
    4 x 999 threshold resamples)."""
    plan = load_interpolation_plan()
    measures, alpha = plan["measures"], plan["alpha"]
    n_boot = n_boot or plan["n_boot"]
    boot_seed = plan["boot_seed"] if boot_seed is None else boot_seed
    design = Design(rows, config["added_domains"], measures, plan["metric"])
    dose = dose_response(design, n_boot=n_boot, seed=boot_seed, alpha=alpha)
    mixed = mixed_models(design, alpha=alpha, drawings=config.get("c2_drawings"))
    endpoints = {}
    for label in dict.fromkeys(r["setup"] for r in rows if r.get("added") is None):
        acc = [r[plan["metric"]] for r in rows if r["setup"] == label]
        endpoints[label] = {"mean": float(np.mean(acc)), "n_models": len(acc),
                            "n_train": sorted({int(r["n_train"]) for r in rows if r["setup"] == label})}
    return {"kind": "interpolation", "schema_version": 1, "config": dict(config),
            "plan": {"file": plan["file"], "sha256": plan["sha256"], "version": plan["version"],
                     "status": "confirmatory" if (n_boot, boot_seed) == (plan["n_boot"], plan["boot_seed"])
                     else "exploratory (bootstrap settings differ from the plan)"},
            "provenance": dict(provenance or {}), "skipped_levels": list(skipped),
            "design": {"mixtures": design.labels, "n_added": design.n_added.tolist(), "seeds": design.seeds,
                       "classes": len(design.classes), "added_domains": design.domains},
            "dose": dose, "endpoints": endpoints, "mixed": mixed,
            "threshold": thresholds(rows, measures, plan, plan["metric"]),
            "verdict": verdict(dose, mixed, measures, alpha), "models": list(rows)}
