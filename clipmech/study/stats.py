"""The study's resampling designs over trained models: accuracy contrasts, sharedness correlations and
causal effects.

Units. The unit of replication is a trained model (setup x seed; natural-only is trained once per
seed and scored on every test domain, so its rows are one model). The unit of evaluation is a
distinct drawing; a model's class-balanced accuracy is the mean of its per-class accuracies.

Contrasts (`contrast`): seeds and C2 classes are crossed, not nested. A resample draws seeds with
replacement and, independently, classes with replacement, and applies that one class draw to every
model (and every test domain) in the resample. Test domains are fixed strata: the estimate is the
mean over test domains of the mean over seeds and classes. A model scored on two test domains enters
both through its seed, so it is resampled as one cluster.

Correlations (`correlation`): Spearman rho between a sharedness measure and C2 accuracy within each
test domain, averaged over domains; models are resampled as clusters (all rows of a model together)
and classes as above (accuracy only: sharedness is one number per row). `centred=True` first
subtracts each setup's mean within the domain from both variables, so only within-setup (seed to
seed) variation is left: does the link hold beyond the setup differences?

Causal effects (`causal_effects`): the per-class paired effect of ablating shared circuit nodes
against matched controls, averaged as a contrast (test domains fixed strata, mean over models and
classes) with models (clusters, as in correlations) and classes resampled crossed.

All three return an `Evidence` dict with the estimate, percentile CI, p* and its Monte-Carlo SE; the
verdicts and multiple-comparison rules are applied by `clipmech.study.report`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clipmech.analysis.bootstrap import adaptive_bootstrap, percentile_ci, tail_probability

DEFAULT_BOOT = 2000
MAX_BOOT = 64000


def model_id(row: Mapping[str, Any]) -> str:
    """The trained model a results row belongs to: its `model_id`, else derived from setup and seed
    (natural-only is one model per seed whatever the test domain)."""
    if row.get("model_id"):
        return str(row["model_id"])
    if row["setup"] == "natural_only":
        return f"natural_only-s{row['seed']}"
    return f"{row['setup']}-{row['test_domain']}-s{row['seed']}"


def class_table(models: Sequence[Mapping[str, Any]], metric: str = "c2_test_acc"
                ) -> tuple[list[str], np.ndarray, bool]:
    """(classes, [rows, C] per-class values, per_class) of `metric` for every row.

    Uses `{metric}_per_class` ({class: accuracy}) when every row has it, restricted to the classes
    every row was scored on; else one pseudo-class holding the row's value (per_class False: then
    classes cannot be resampled).
    """
    per = [m.get(f"{metric}_per_class") for m in models]
    if models and all(per):
        classes = [c for c in per[0] if all(c in p for p in per[1:])]
        if classes:
            return classes, np.array([[p[c] for c in classes] for p in per], dtype=float), True
    return ["(all)"], np.array([[m[metric]] for m in models], dtype=float), False


def _multinomial(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """[size, n] resampling counts of n units drawn with replacement (bincount of uniform draws:
    ~50x faster than rng.multinomial with many rows)."""
    flat = rng.integers(0, n, (size, n)) + n * np.arange(size)[:, None]
    return np.bincount(flat.ravel(), minlength=size * n).reshape(size, n).astype(float)


def _summary(estimate: float | None, boots: np.ndarray | None, level: float) -> dict[str, Any]:
    out: dict[str, Any] = {"estimate": estimate, "ci_low": None, "ci_high": None, "level": level,
                           "p_star": None, "p_star_se": None, "n_boot": 0, "n_boot_valid": 0}
    if boots is None or estimate is None:
        return out
    finite = boots[np.isfinite(boots)]
    out["n_boot"], out["n_boot_valid"] = int(boots.size), int(finite.size)
    if finite.size:
        out["ci_low"], out["ci_high"] = percentile_ci(finite, level)
        out["p_star"], out["p_star_se"] = tail_probability(finite)
    return out


def contrast(models: Sequence[Mapping[str, Any]], better: str, worse: str | None, metric: str = "c2_test_acc",
             n_boot: int = DEFAULT_BOOT, max_boot: int = MAX_BOOT, level: float = 0.95, n_tests: int = 1,
             seed: int = 0, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean of metric(better) - metric(worse) over test domains, seeds and classes, with the crossed
    seed x class bootstrap (module docstring). `classes` restricts to those classes (pilot curves).
    `worse=None`: the mean of metric(better) itself (a setup's accuracy, same resampling).

    Returns {"better", "worse", "metric", "estimate", "ci_low", "ci_high", "level", "p_star",
    "p_star_se", "n_boot", "n_models", "n_seeds", "n_classes", "n_domains", "resampled"}. Without
    variation to resample (one seed and no per-class values) the CI and p* are None.
    Cost O(B * D * S * C) with B the number of resamples (adaptive, <= max_boot).
    """
    rows = [m for m in models if m["setup"] in (better, worse)]
    names, values, per_class = class_table(rows, metric)
    if classes is not None and per_class:
        keep = [names.index(c) for c in classes if c in names]
        names, values = [names[i] for i in keep], values[:, keep]
    domains = sorted({m["test_domain"] for m in rows})
    seeds = sorted({m["seed"] for m in rows})
    table = {s: np.full((len(domains), len(seeds), len(names)), np.nan) for s in (better, worse)}
    table[None] = np.zeros_like(table[better])
    for m, v in zip(rows, values):
        table[m["setup"]][domains.index(m["test_domain"]), seeds.index(m["seed"])] = v
    diff = table[better] - table[worse]  # [D, S, C]; NaN where a (domain, seed) lacks either setup
    mask = np.isfinite(diff)
    used = mask.any(axis=2)
    out = {"better": better, "worse": worse, "metric": metric,
           "n_models": len({model_id(m) for m in rows if used[domains.index(m["test_domain"]),
                                                                seeds.index(m["seed"])]}),
           "n_seeds": int(used.any(axis=0).sum()), "n_classes": len(names) if per_class else None,
           "n_domains": int(used.any(axis=1).sum()), "resampled": []}
    if not mask.any():
        return out | _summary(None, None, level)
    return out | _crossed(diff, "seeds", per_class, n_boot, max_boot, level, n_tests, seed)


def _crossed_means(values: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """stat(wu [B, U], wc [B, C]) -> [B] for a [D, U, C] table (NaN = missing): per domain the
    (unit weight x class weight)-weighted mean of its values, then the mean over the domains that
    keep any weight."""
    mask = np.isfinite(values)
    v0, m = np.where(mask, values, 0.0), mask.astype(float)

    def stat(wu: np.ndarray, wc: np.ndarray) -> np.ndarray:
        num = np.einsum("bu,duc,bc->bd", wu, v0, wc)
        den = np.einsum("bu,duc,bc->bd", wu, m, wc)
        kept = den > 0
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample can leave every domain empty: NaN
            return np.where(kept, num / np.where(kept, den, 1.0), 0.0).sum(1) / kept.sum(1)
    return stat


def _crossed(values: np.ndarray, unit: str, per_class: bool, n_boot: int, max_boot: int, level: float,
             n_tests: int, seed: int) -> dict[str, Any]:
    """Estimate and crossed bootstrap of `_crossed_means` over a [D, U, C] table: units (`unit`
    names them: seeds, models) and classes are drawn independently, one class draw for every unit;
    each only when it has >= 2 levels (classes also only when `per_class`)."""
    stat = _crossed_means(values)
    _, n_units, n_classes = values.shape
    estimate = float(stat(np.ones((1, n_units)), np.ones((1, n_classes)))[0])
    resample_units, resample_classes = n_units >= 2, per_class and n_classes >= 2
    resampled = ([unit] if resample_units else []) + (["classes"] if resample_classes else [])
    if not resampled:
        return {"resampled": []} | _summary(estimate, None, level)

    def draw(rng: np.random.Generator, b: int) -> np.ndarray:
        wu = _multinomial(rng, n_units, b) if resample_units else np.ones((b, n_units))
        wc = _multinomial(rng, n_classes, b) if resample_classes else np.ones((b, n_classes))
        with np.errstate(invalid="ignore"):
            return stat(wu, wc)

    boots = adaptive_bootstrap(draw, n_boot, max_boot, alpha=1 - level, n_tests=n_tests, seed=seed)
    return {"resampled": resampled} | _summary(estimate, boots, level)


def causal_effects(models: Sequence[Mapping[str, Any]], what: str = "logit", n_boot: int = DEFAULT_BOOT,
                   max_boot: int = MAX_BOOT, level: float = 0.95, n_tests: int = 1, seed: int = 0) -> dict[str, Any]:
    """Mean paired causal effect over test domains, models and classes: per row the per-class
    `controls.causal.per_class[k]["effect_<what>"]` (what: "logit" or "accuracy"; drop after ablating
    the shared nodes minus drop after ablating their matched controls, `clipmech.analysis.controls`).
    Models and classes are resampled crossed (as `contrast`, with models in place of seeds); a model
    with rows on two test domains (natural-only) is one cluster. Rows without per-class effects (old
    results files, controls not run) are dropped and counted; with none left the estimate is None
    and "reason" says why. Returns {"what", "estimate", "ci_low", "ci_high", "level", "p_star",
    "p_star_se", "n_boot", "n_rows", "n_dropped", "n_models", "n_classes", "n_domains", "resampled"}.
    Cost O(B * D * M * C)."""
    if what not in ("logit", "accuracy"):
        raise ValueError(f"what must be 'logit' or 'accuracy', got {what!r}")
    key = f"effect_{what}"
    rows = []
    for m in models:
        per_class = ((m.get("controls") or {}).get("causal") or {}).get("per_class") or {}
        vals = {k: float(v[key]) for k, v in per_class.items() if v.get(key) is not None and np.isfinite(v[key])}
        if vals:
            rows.append((m, vals))
    ids = sorted({model_id(m) for m, _ in rows})
    domains = sorted({m["test_domain"] for m, _ in rows})
    classes = list(dict.fromkeys(k for _, vals in rows for k in vals))
    out: dict[str, Any] = {"what": what, "n_rows": len(rows), "n_dropped": len(models) - len(rows),
                           "n_models": len(ids), "n_classes": len(classes), "n_domains": len(domains)}
    if not rows:
        return out | {"resampled": [], "reason": "no model row carries per-class causal effects "
                                                 "(controls.causal.per_class)"} | _summary(None, None, level)
    table = np.full((len(domains), len(ids), len(classes)), np.nan)
    for m, vals in rows:
        d, u = domains.index(m["test_domain"]), ids.index(model_id(m))
        if np.isfinite(table[d, u]).any():
            raise ValueError(f"two rows of model {model_id(m)!r} on test domain {m['test_domain']!r} carry causal "
                             "effects; give each trained model one row per test domain")
        table[d, u, [classes.index(k) for k in vals]] = list(vals.values())
    return out | _crossed(table, "models", True, n_boot, max_boot, level, n_tests, seed)


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman rho per row of [B, n] values x, y with integer weights w [B, n] (row b = a sample
    holding w[b, i] copies of point i; ties get average ranks, as scipy.stats.spearmanr). NaN where
    either variable is constant. Cost O(B n^2)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        less = (v[:, None, :] < v[:, :, None]).astype(float)  # [b, i, j] = v_j < v_i
        equal = (v[:, None, :] == v[:, :, None]).astype(float)
        return np.einsum("bij,bj->bi", less, w) + (np.einsum("bij,bj->bi", equal, w) + 1) / 2

    rx, ry = ranks(x), ranks(y)
    tot = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty resample (tot 0) gives NaN
        rx = rx - (w * rx).sum(1, keepdims=True) / tot
        ry = ry - (w * ry).sum(1, keepdims=True) / tot
        den = np.sqrt((w * rx ** 2).sum(1) * (w * ry ** 2).sum(1))
        return np.where(den > 1e-12, (w * rx * ry).sum(1) / den, np.nan)


def _centre(v: np.ndarray, w: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[B, n] values minus the weighted mean of their group (setup) within each resample."""
    out = v.copy()
    for g in np.unique(groups):
        cols = groups == g
        tot = w[:, cols].sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(tot > 0, (w[:, cols] * v[:, cols]).sum(1, keepdims=True) / tot, 0.0)
        out[:, cols] = v[:, cols] - mean
    return out


def correlation(models: Sequence[Mapping[str, Any]], measure: str, metric: str = "c2_test_acc",
                centred: bool = False, n_boot: int = DEFAULT_BOOT, max_boot: int = MAX_BOOT,
                level: float = 0.95, n_tests: int = 1, seed: int = 0) -> dict[str, Any]:
    """Spearman rho(measure, metric) within each test domain, averaged over domains, with the
    cluster (model) x class bootstrap (module docstring); `centred` for the setup-centred variant.

    Rows whose measure is None / non-finite are dropped and counted (`n_dropped`). A domain with
    fewer than 3 rows, or where a variable is constant, is left out of the average and named in
    `skipped_domains`; with no domain left, rho is None with a "reason". Returns
    {"measure", "rho", "estimate", "ci_low", "ci_high", "level", "p_star", "p_star_se", "n",
    "n_models", "n_classes", "n_domains", "n_dropped", "skipped_domains", "centred", ...}.
    """
    ok = [m for m in models if m.get(measure) is not None and np.isfinite(m[measure])]
    names, acc, per_class = class_table(ok, metric) if ok else (["(all)"], np.zeros((0, 1)), False)
    ids = sorted({model_id(m) for m in ok})
    out: dict[str, Any] = {"measure": measure, "metric": metric, "centred": centred, "n": len(ok),
                           "n_models": len(ids), "n_classes": len(names) if per_class else None,
                           "n_dropped": len(models) - len(ok), "skipped_domains": {}, "resampled": []}
    x = np.array([m[measure] for m in ok], dtype=float)
    cluster = np.array([ids.index(model_id(m)) for m in ok], dtype=int)
    setups = np.array([m["setup"] for m in ok])
    by_domain: dict[str, np.ndarray] = {}
    for d in sorted({m["test_domain"] for m in ok}):
        rows = np.array([i for i, m in enumerate(ok) if m["test_domain"] == d])
        if rows.size < 3:
            out["skipped_domains"][d] = f"only {rows.size} model(s) have {measure}; need at least 3"
        else:
            by_domain[d] = rows

    def stat(wm: np.ndarray, wc: np.ndarray, domains: Sequence[np.ndarray]) -> np.ndarray:
        w = wm[:, cluster]  # [B, n]
        y = np.round(wc @ acc.T / wc.sum(1, keepdims=True), 12)  # [B, n]; rounding keeps exact ties tied
        xs = np.broadcast_to(x, y.shape)
        rhos = []
        for rows in domains:
            xd, yd, wd = xs[:, rows], y[:, rows], w[:, rows]
            if centred:
                xd, yd = _centre(xd, wd, setups[rows]), _centre(yd, wd, setups[rows])
                xd, yd = np.round(xd, 12), np.round(yd, 12)
            rhos.append(weighted_spearman(xd, yd, wd))
        return np.mean(rhos, axis=0) if rhos else np.full(len(wm), np.nan)

    ones = (np.ones((1, len(ids))), np.ones((1, len(names))))
    for d, rows in list(by_domain.items()):  # domains where the full-sample rho is undefined
        if not np.isfinite(stat(*ones, [rows])[0]):
            out["skipped_domains"][d] = f"{measure} or {metric} is constant across its {rows.size} models"
            del by_domain[d]
    out["n_domains"] = len(by_domain)
    if not by_domain:
        out["reason"] = "; ".join(f"{d}: {r}" for d, r in out["skipped_domains"].items()) or "no models"
        return out | _summary(None, None, level) | {"rho": None}
    estimate = float(stat(*ones, list(by_domain.values()))[0])
    resample_classes = per_class and len(names) >= 2
    out["resampled"] = ["models"] + (["classes"] if resample_classes else [])

    def draw(rng: np.random.Generator, b: int) -> np.ndarray:
        wc = _multinomial(rng, len(names), b) if resample_classes else np.ones((b, len(names)))
        return stat(_multinomial(rng, len(ids), b), wc, list(by_domain.values()))

    boots = adaptive_bootstrap(_chunked(draw), n_boot, max_boot, alpha=1 - level, n_tests=n_tests, seed=seed)
    return out | _summary(estimate, boots, level) | {"rho": estimate}


def _chunked(draw: Callable[[np.random.Generator, int], np.ndarray], chunk: int = 4000
             ) -> Callable[[np.random.Generator, int], np.ndarray]:
    """`draw` in chunks of at most `chunk` resamples (bounds the [B, n, n] rank arrays' memory)."""
    def run(rng: np.random.Generator, b: int) -> np.ndarray:
        return np.concatenate([draw(rng, min(chunk, b - i)) for i in range(0, b, chunk)])
    return run
