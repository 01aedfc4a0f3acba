"""The study's results file and its written report.

`results.json` (schema version 1) holds one row per trained model with its DG/CG accuracies and
sharedness measures, plus, per sharedness measure, the Spearman correlation with C2 accuracy across
models and a bootstrap confidence interval. `report.md` says which of the paper's three findings the
numbers reproduce. Verdicts follow fixed rules (sign of an effect and whether its CI excludes 0),
written down in `_verdict`, so the report cannot be tuned to agree with the paper.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from clipmech.utils import PathLike, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
SHAREDNESS_MEASURES = ("cka_mid", "node_jaccard", "edge_jaccard", "feature_sharing")
ACCURACY_FIELDS = ("c1_test_acc", "c2_test_acc")
MODEL_FIELDS = ("setup", "seed", "test_domain") + ACCURACY_FIELDS + SHAREDNESS_MEASURES
MAIN_SETUPS = ("natural_only", "lod", "cg_low", "cg_high")


def middle_third(n_points: int) -> slice:
    """The analysis points `cka_mid` averages over: indices [n//3, n - n//3) (all when n < 3)."""
    if n_points < 1:
        raise ValueError("middle_third needs at least one analysis point")
    k = n_points // 3
    return slice(k, n_points - k)


def cka_mid(per_layer: Mapping[tuple[str, str], Sequence[float]], test_domain: str) -> float:
    """Mean CKA between `test_domain` and every other domain over the middle third of the points.

    `per_layer[(a, b)]` = CKA per analysis point (same order for every pair). Pairs without the
    test domain are ignored. Raises if no pair contains it.
    """
    rows = [np.asarray(v, dtype=float) for (a, b), v in per_layer.items() if test_domain in (a, b) and a != b]
    if not rows:
        raise ValueError(f"no CKA pair contains the test domain {test_domain!r}; pairs: {sorted(per_layer)[:5]}")
    arr = np.stack(rows)
    mid = arr[:, middle_third(arr.shape[1])]
    if not np.all(np.isfinite(mid)):
        raise ValueError(f"CKA for test domain {test_domain!r} has non-finite values in the middle layers")
    return float(mid.mean())


def spearman_ci(x: Sequence[float | None], y: Sequence[float | None], n_boot: int = 2000,
                level: float = 0.95, seed: int = 0, names: tuple[str, str] = ("x", "y")) -> dict[str, Any]:
    """Spearman rho of paired values with a percentile bootstrap CI over pairs.

    Pairs with a missing (None / NaN) value are dropped and counted. Returns {"rho", "ci_low",
    "ci_high", "p_value", "n", "n_dropped", "n_boot_valid"}; rho and the CI are None, with a
    "reason", when fewer than 3 pairs remain or a variable is constant (never NaN). Bootstrap
    resamples in which a variable is constant are skipped (counted in n_boot_valid). Cost
    O(n_boot * n log n).
    """
    xa = np.array([np.nan if v is None else v for v in x], dtype=float)
    ya = np.array([np.nan if v is None else v for v in y], dtype=float)
    if xa.shape != ya.shape:
        raise ValueError(f"spearman_ci: x has {xa.size} values but y has {ya.size}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    out: dict[str, Any] = {"rho": None, "ci_low": None, "ci_high": None, "p_value": None,
                           "n": int(keep.sum()), "n_dropped": int((~keep).sum()), "n_boot_valid": 0,
                           "level": level}
    if xa.size < 3:
        out["reason"] = f"only {xa.size} model(s) have this measure; need at least 3"
        return out
    constant = [name for name, v in zip(names, (xa, ya)) if np.ptp(v) == 0]
    if constant:
        out["reason"] = f"{' and '.join(constant)} is constant across the {xa.size} models"
        return out
    res = stats.spearmanr(xa, ya)
    out["rho"], out["p_value"] = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, xa.size, size=(n_boot, xa.size))
    rx, ry = stats.rankdata(xa[idx], axis=1), stats.rankdata(ya[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    valid = denom > 0  # resamples where one variable came out constant have no rank correlation
    rhos = (rx * ry).sum(1)[valid] / denom[valid]
    out["n_boot_valid"] = int(valid.sum())
    if rhos.size == 0:
        out["reason"] = "every bootstrap resample was constant"
        return out
    alpha = (1 - level) / 2
    out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(rhos, [alpha, 1 - alpha]))
    return out


def paired_difference(models: Sequence[Mapping[str, Any]], better: str, worse: str,
                      metric: str = "c2_test_acc", n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict[str, Any]:
    """Mean of metric(better) - metric(worse), paired by (test_domain, seed), with a bootstrap CI.

    When both rows of a unit carry per-class accuracies (`{metric}_per_class`, {class: accuracy};
    the metric is class-balanced, so its classes are its samples) the bootstrap resamples units and,
    within each unit, the classes both models were scored on: one unit still gets a CI from the
    class-to-class variation. Without them only units are resampled and n < 2 gives no CI.
    Returns {"better", "worse", "metric", "diff", "ci_low", "ci_high", "n", "n_classes", "ci_over"}.
    """
    by_unit: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for m in models:
        by_unit.setdefault((m["test_domain"], m["seed"]), {})[m["setup"]] = m
    pairs = [(u[better], u[worse]) for u in by_unit.values() if better in u and worse in u]
    out: dict[str, Any] = {"better": better, "worse": worse, "metric": metric, "diff": None,
                           "ci_low": None, "ci_high": None, "n": len(pairs), "n_classes": None,
                           "ci_over": None, "level": level}
    if not pairs:
        return out
    diffs = np.array([b[metric] - w[metric] for b, w in pairs])
    out["diff"] = float(diffs.mean())
    per_class = [_class_differences(b, w, metric) for b, w in pairs]
    rng = np.random.default_rng(seed)
    if all(c is not None and c.size >= 2 for c in per_class):
        boots = _two_level_bootstrap(per_class, n_boot, rng)
        out["n_classes"], out["ci_over"] = int(sum(c.size for c in per_class)), "units and classes"
    elif diffs.size >= 2:
        boots = diffs[rng.integers(0, diffs.size, size=(n_boot, diffs.size))].mean(1)
        out["ci_over"] = "units"
    else:
        return out
    alpha = (1 - level) / 2
    out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(boots, [alpha, 1 - alpha]))
    return out


def _two_level_bootstrap(groups: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] bootstrap means: values resampled within each group, then groups resampled."""
    within = np.stack([g[rng.integers(0, g.size, (n_boot, g.size))].mean(1) for g in groups])  # [G, n_boot]
    pick = rng.integers(0, len(groups), (n_boot, len(groups)))
    return within[pick, np.arange(n_boot)[:, None]].mean(1)


def _class_differences(better: Mapping[str, Any], worse: Mapping[str, Any], metric: str) -> np.ndarray | None:
    """Per-class accuracy differences over the classes both rows scored, or None without them."""
    b, w = better.get(f"{metric}_per_class"), worse.get(f"{metric}_per_class")
    if not b or not w:
        return None
    common = [c for c in b if c in w]
    return np.array([b[c] - w[c] for c in common]) if common else None


def _verdict(value: float | None, ci_low: float | None, ci_high: float | None) -> str:
    """Fixed rule: 'reproduced' iff the effect is positive and its CI excludes 0, 'contradicted' iff
    negative with CI excluding 0, otherwise 'inconclusive'. Without a CI (one unit) the sign alone
    gives 'consistent (no CI)' or 'not reproduced (no CI)'."""
    if value is None:
        return "not measured"
    if ci_low is None or ci_high is None:
        return "consistent (no CI)" if value > 0 else "not reproduced (no CI)"
    if ci_low > 0:
        return "reproduced"
    if ci_high < 0:
        return "contradicted"
    return "inconclusive (CI includes 0)"


def _combine(verdicts: Sequence[str], mode: str) -> str:
    """One verdict from the evidence's: mode "all" needs every piece, "any" one piece. A mix of
    reproduced and inconclusive pieces is "partly reproduced (k of n)"; only inconclusive pieces
    give "inconclusive"."""
    if not verdicts or all(v == "not measured" for v in verdicts):
        return "not measured"
    need = all if mode == "all" else any
    opposite = any if mode == "all" else all
    if need(v == "reproduced" for v in verdicts):
        return "reproduced"
    if opposite(v == "contradicted" for v in verdicts):
        return "contradicted"
    if need(v in ("reproduced", "consistent (no CI)") for v in verdicts):
        return "consistent (no CI)"
    n_repro = sum(v == "reproduced" for v in verdicts)
    if n_repro and not any(v == "contradicted" for v in verdicts):
        return f"partly reproduced ({n_repro} of {len(verdicts)})"
    if all(v.startswith("inconclusive") for v in verdicts):
        return "inconclusive"
    return "not reproduced"


def assess_findings(models: Sequence[Mapping[str, Any]],
                    correlations: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's three findings, each with its evidence and a verdict from `_verdict`.

    1 diversity helps DG (LOD > natural-only) and CG (CG-high > CG-low) on C2 accuracy;
    2 CG can fall below DG (LOD > CG-low or LOD > CG-high);
    3 sharedness goes with generalization (Spearman rho > 0, per measure).
    """
    findings = []
    f1 = [paired_difference(models, "lod", "natural_only"), paired_difference(models, "cg_high", "cg_low")]
    findings.append({"finding": "domain diversity helps DG and CG", "evidence": f1})
    f2 = [paired_difference(models, "lod", "cg_low"), paired_difference(models, "lod", "cg_high")]
    findings.append({"finding": "CG can fall below DG", "evidence": f2})
    f3 = [{"measure": k, **dict(v)} for k, v in correlations.items()]
    findings.append({"finding": "sharedness goes with generalization", "evidence": f3})
    for f in findings:
        for e in f["evidence"]:
            e["verdict"] = _verdict(e.get("diff", e.get("rho")), e["ci_low"], e["ci_high"])
    # Finding 1 needs both halves, finding 2 one CG setup below DG, finding 3 every measure.
    modes = {"domain diversity helps DG and CG": "all", "CG can fall below DG": "any",
             "sharedness goes with generalization": "all"}
    for f in findings:
        f["verdict"] = _combine([e["verdict"] for e in f["evidence"]], modes[f["finding"]])
    return findings


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ValueError listing every way `results` departs from schema version 1."""
    problems: list[str] = []
    for key in ("schema_version", "models", "correlations"):
        if key not in results:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        raise ValueError("results.json: " + "; ".join(problems))
    if results["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {results['schema_version']!r} != {SCHEMA_VERSION}")
    if not isinstance(results["models"], list) or not results["models"]:
        problems.append("'models' must be a non-empty list")
    for i, m in enumerate(results["models"] if isinstance(results["models"], list) else []):
        missing = [f for f in MODEL_FIELDS if f not in m]
        if missing:
            problems.append(f"models[{i}] lacks {missing}")
            continue
        if not isinstance(m["setup"], str) or not isinstance(m["test_domain"], str):
            problems.append(f"models[{i}]: setup and test_domain must be strings")
        if not isinstance(m["seed"], int):
            problems.append(f"models[{i}]: seed must be an int, got {m['seed']!r}")
        for f in ACCURACY_FIELDS:
            if not _is_number(m[f]) or not 0.0 <= m[f] <= 1.0:
                problems.append(f"models[{i}].{f} = {m[f]!r} is not an accuracy in [0, 1]")
        for f in SHAREDNESS_MEASURES:
            if not _is_number(m[f]) or not -1.0 <= m[f] <= 1.0:
                problems.append(f"models[{i}].{f} = {m[f]!r} is not a finite number in [-1, 1]")
    for measure in SHAREDNESS_MEASURES:
        c = results["correlations"].get(measure)
        if c is None:
            problems.append(f"correlations lacks {measure!r}")
            continue
        for k in ("rho", "ci_low", "ci_high", "n"):
            if k not in c:
                problems.append(f"correlations[{measure!r}] lacks {k!r}")
        if c.get("rho") is None and not c.get("reason"):
            problems.append(f"correlations[{measure!r}]: rho is None without a 'reason'")
        if c.get("ci_low") is not None and not c["ci_low"] <= c["ci_high"]:
            problems.append(f"correlations[{measure!r}]: ci_low > ci_high")
    if problems:
        raise ValueError("results.json does not match schema version 1: " + "; ".join(problems))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_results(models: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None, n_boot: int = 2000) -> dict[str, Any]:
    """The results.json object: models, correlations (per measure vs c2_test_acc), findings."""
    models = [dict(m) for m in models]
    correlations = {k: spearman_ci([m.get(k) for m in models], [m["c2_test_acc"] for m in models],
                                   n_boot=n_boot, names=(k, "c2_test_acc")) for k in SHAREDNESS_MEASURES}
    results = {"schema_version": SCHEMA_VERSION, "config": dict(config or {}), "models": models,
               "correlations": correlations, "findings": assess_findings(models, correlations),
               "extra": dict(extra or {})}
    validate_results(results)
    return results


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _ci(e: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if e.get("ci_low") is None:
        return "no CI"
    return f"[{scale * e['ci_low']:.{digits}f}, {scale * e['ci_high']:.{digits}f}]"


def setup_summary(models: Iterable[Mapping[str, Any]], n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """Per setup: mean C1/C2 accuracy with a 95% bootstrap CI over models (test domains x seeds)
    and, where rows carry `{field}_per_class`, over classes within each model (see paired_difference)."""
    by_setup: dict[str, list[Mapping[str, Any]]] = {}
    for m in models:
        by_setup.setdefault(m["setup"], []).append(m)
    out = {}
    for setup, rows in by_setup.items():
        entry: dict[str, Any] = {"n": len(rows)}
        for f in ACCURACY_FIELDS:
            vals = np.array([r[f] for r in rows], dtype=float)
            per_class = [np.array(list((r.get(f"{f}_per_class") or {}).values()), dtype=float) for r in rows]
            rng = np.random.default_rng(0)
            ci = (None, None)
            if all(c.size >= 2 for c in per_class):
                ci = tuple(float(v) for v in np.quantile(_two_level_bootstrap(per_class, n_boot, rng), [0.025, 0.975]))
            elif vals.size >= 2:
                boots = vals[rng.integers(0, vals.size, (n_boot, vals.size))].mean(1)
                ci = tuple(float(v) for v in np.quantile(boots, [0.025, 0.975]))
            entry[f] = {"mean": float(vals.mean()), "ci_low": ci[0], "ci_high": ci[1]}
        out[setup] = entry
    return out


def render_report(results: Mapping[str, Any], figures: Mapping[str, str] | None = None) -> str:
    """report.md text: setup table, findings with verdicts, correlations, figures, caveats."""
    cfg = results.get("config", {})
    lines = ["# clipmech study report", ""]
    if cfg:
        lines += ["Configuration: " + ", ".join(f"{k} = `{v}`" for k, v in sorted(cfg.items())
                                               if not isinstance(v, (dict, list))), ""]
    lines += ["## Accuracy per setup", "",
              "Class-balanced zero-shot top-1 (%) on the test domain; mean over models with a 95% "
              "bootstrap CI over models and, within each, over classes. C2 = held-out classes, C1 = the others.", "",
              "| setup | models | C1 accuracy | C2 accuracy |", "|---|---|---|---|"]
    summary = setup_summary(results["models"])
    order = [s for s in MAIN_SETUPS if s in summary] + [s for s in summary if s not in MAIN_SETUPS]
    for s in order:
        e = summary[s]
        lines.append(f"| {s} | {e['n']} | {_pct(e['c1_test_acc']['mean'])} {_ci(e['c1_test_acc'])} "
                     f"| {_pct(e['c2_test_acc']['mean'])} {_ci(e['c2_test_acc'])} |")
    lines += ["", "## The paper's findings", "",
              "Verdict rule (fixed in advance): *reproduced* when the effect has the paper's sign and its "
              "95% bootstrap CI excludes 0; *contradicted* when the opposite sign's CI excludes 0; "
              "otherwise *inconclusive*. Accuracy differences are paired by (test domain, seed); their CI "
              "resamples those units and, within each, the C2 classes (the accuracy is class-balanced). "
              "Without per-class accuracies and with one unit there is no CI and only the sign is "
              "reported.", ""]
    for f in results["findings"]:
        lines.append(f"### {f['finding']}: **{f['verdict']}**")
        lines.append("")
        for e in f["evidence"]:
            if "measure" in e:
                rho = "n/a" if e["rho"] is None else f"{e['rho']:.2f}"
                why = f" ({e['reason']})" if e.get("reason") else ""
                lines.append(f"- Spearman ρ({e['measure']}, C2 accuracy) = {rho} "
                             f"{_ci(e, 1.0, 2)}, n = {e['n']} models{why}: {e['verdict']}")
            else:
                diff = "n/a" if e["diff"] is None else f"{100 * e['diff']:+.1f}"
                over = f", CI over {e['ci_over']}" if e.get("ci_over") else ""
                lines.append(f"- C2 accuracy {e['better']} − {e['worse']} = {diff} points "
                             f"{_ci(e)}, n = {e['n']} paired units{over}: {e['verdict']}")
        lines.append("")
    lines += ["## Models", "", "| setup | test domain | seed | C1 % | C2 % | " +
              " | ".join(SHAREDNESS_MEASURES) + " |", "|---" * (5 + len(SHAREDNESS_MEASURES)) + "|"]
    for m in results["models"]:
        lines.append(f"| {m['setup']} | {m['test_domain']} | {m['seed']} | {_pct(m['c1_test_acc'])} | "
                     f"{_pct(m['c2_test_acc'])} | " +
                     " | ".join(f"{m[k]:.3f}" for k in SHAREDNESS_MEASURES) + " |")
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"- `{name}`: {desc}" for name, desc in figures.items()]
    lines += ["", "## Caveats", "",
              "- Tiny models on the embedded emoji domains: the numbers test whether the paper's "
              "*qualitative* findings appear at toy scale; they are not comparable to the paper's "
              "DomainNet accuracies.",
              "- Correlations pool models of different setups and seeds; they are correlational, "
              "not causal, and with few models the CIs are wide.", ""]
    return "\n".join(lines)


def write_outputs(results: Mapping[str, Any], out_dir: PathLike,
                  figures: Mapping[str, str] | None = None) -> None:
    """Validate and write results.json and report.md into `out_dir` atomically."""
    from pathlib import Path

    validate_results(results)
    out = Path(out_dir)
    atomic_write_json(results, out / "results.json")
    atomic_write_text(render_report(results, figures), out / "report.md")
