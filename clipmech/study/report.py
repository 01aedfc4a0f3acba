"""The study's results file and its written report.

`results.json` (schema version SCHEMA_VERSION) holds one row per trained model and test domain with
its DG/CG accuracies and sharedness measures, plus, per sharedness measure, the within-domain
Spearman correlation with C2 accuracy (`clipmech.study.stats`). `report.md` says which of the paper's
three findings the numbers reproduce, and whether ablating shared circuit nodes costs more than
ablating matched controls (the causal finding, from the rows' `controls.causal`). Verdicts follow
a rule fixed in advance (the bootstrap tail probability p* and its Monte-Carlo error,
`clipmech.analysis.bootstrap.decide`, with Holm where a claim has several tests), so the report
cannot be tuned to agree with the paper.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from clipmech.analysis import bootstrap as B
from clipmech.analysis.causal import BALANCE_LIMIT, balance_summary, causal_finding
from clipmech.study import stats as S
from clipmech.study.measure_reliability import disattenuated, reliability, row_score_se
from clipmech.study.analysis_plan import Plan, load_plan
from clipmech.utils import PathLike, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 3  # 3: nullable sharedness measures with null_reasons, provenance block
SHAREDNESS_MEASURES = ("cka_mid", "node_jaccard", "edge_jaccard", "feature_sharing")
ACCURACY_FIELDS = ("c1_test_acc", "c2_test_acc")
MODEL_FIELDS = ("setup", "seed", "test_domain", "model_id") + ACCURACY_FIELDS + SHAREDNESS_MEASURES
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


ALPHA = 0.05
POWER_TARGET = 0.15  # issue 12: 95% CI half-width of each main contrast, pooled over test domains
MAIN_CONTRASTS = (("lod", "natural_only"), ("cg_high", "cg_low"), ("lod", "cg_low"), ("lod", "cg_high"))
# The findings, their contrasts, sides and rules come from the analysis plan (`clipmech.study.analysis_plan`).
SHAREDNESS_FINDING = "sharedness goes with generalization"
CAUSAL_FINDING = "shared circuit nodes matter causally (matched controls)"
RULES = {"all": "each contrast must hold on its own (no correction to reproduce); Holm over the contrasts' "
                "opposite tails to contradict (one contradicted contrast contradicts the claim)",
         "single": "one test, the true-class logit effect (no correction); accuracy and setups reported beside",
         "any": "any contrast suffices: Holm over the finding's contrasts",
         "one": "the first contrast decides (no correction); the others are reported beside, not judged",
         "holm_measures": "Holm over the four sharedness measures on both tails; every measure must hold"}
# The side of each rule that Holm's correction applies to (`clipmech.analysis.bootstrap.decide_family`).
CORRECTED_SIDE = {"all": "contradict", "single": "none", "one": "none", "any": "reproduce", "holm_measures": "both"}


def _apply_rule(evidence: list[dict[str, Any]], rule: str, alpha: float = ALPHA) -> None:
    """Fill each piece's Holm-adjusted p* and opposite tail (`p_adjusted`, `p_opposite_adjusted`: the
    raw values where `rule` does not correct that side), its verdict under `rule`
    (`clipmech.analysis.bootstrap.decide_family`, exact Monte-Carlo bands) and its unadjusted verdict."""
    measured = [e for e in evidence if e.get("p_star") is not None]
    side = CORRECTED_SIDE[rule]
    ns = [int(e.get("n_boot_valid") or e["n_boot"]) for e in measured]
    ps = [e["p_star"] for e in measured]
    adj_p = B.holm(ps)[0] if side in ("reproduce", "both") else ps
    adj_q = B.holm([1 - p for p in ps])[0] if side in ("contradict", "both") else [1 - p for p in ps]
    for e, v, pa, qa, n in zip(measured, B.decide_family(ps, ns, alpha, side), adj_p, adj_q, ns):
        e["p_adjusted"], e["p_opposite_adjusted"], e["verdict"] = pa, qa, v
        e["verdict_unadjusted"] = B.decide_family([e["p_star"]], [n], alpha)[0]
        e["p_text"] = B.format_p(e["p_star"], n)
    for e in evidence:
        e["rule"] = RULES[rule]
        if e.get("p_star") is None:
            e["p_adjusted"] = e["p_opposite_adjusted"] = e["verdict_unadjusted"] = None
            e["verdict"] = _no_ci_verdict(e.get("estimate"))


def _no_ci_verdict(value: float | None) -> str:
    """Without resampling variation (one seed, no per-class values) only the sign is reported."""
    if value is None:
        return "not measured"
    return "consistent (no CI)" if value > 0 else "not reproduced (no CI)"


def _combine(verdicts: Sequence[str], mode: str) -> str:
    """One verdict from the pieces': mode "all" needs every piece reproduced (contradicted when any
    piece is), mode "any" one piece (contradicted when every piece is). Short of that: "partly
    reproduced (k of n)" for "all" with some reproduced pieces, "inconclusive (borderline)" when a
    piece sits on its threshold, else "inconclusive"."""
    if not verdicts or all(v == "not measured" for v in verdicts):
        return "not measured"
    need, opposite = (all, any) if mode == "all" else (any, all)
    if need(v == B.REPRODUCED for v in verdicts):
        return B.REPRODUCED
    if opposite(v == B.CONTRADICTED for v in verdicts):
        return B.CONTRADICTED
    if need(v in (B.REPRODUCED, "consistent (no CI)") for v in verdicts):
        return "consistent (no CI)"
    n_repro = sum(v == B.REPRODUCED for v in verdicts)
    if mode == "all" and n_repro and not any(v == B.CONTRADICTED for v in verdicts):
        return f"partly reproduced ({n_repro} of {len(verdicts)})"
    if any(v == B.BORDERLINE for v in verdicts):
        return B.BORDERLINE
    if any(v.startswith(B.INCONCLUSIVE) or v == B.CONTRADICTED for v in verdicts):
        return B.INCONCLUSIVE
    return "not reproduced"


def judged_measure(models: Sequence[Mapping[str, Any]], measure: str, variant: str = "normalized") -> str:
    """The variable finding 3 judges for `measure` under the plan's `variant`: "raw" -> `measure`;
    "normalized" -> `{measure}_norm` (between floor and ceiling) when every row has a finite one,
    else the raw `measure`."""
    if variant not in ("raw", "normalized"):
        raise ValueError(f"sharedness variant must be 'raw' or 'normalized', got {variant!r}")
    key = f"{measure}_norm"
    ok = all(_is_number(m.get(key)) for m in models)
    return key if variant == "normalized" and models and ok else measure


def correlations_for(models: Sequence[Mapping[str, Any]], n_boot: int = S.DEFAULT_BOOT, seed: int = 0,
                     max_boot: int = S.MAX_BOOT, variant: str = "normalized") -> dict[str, dict[str, Any]]:
    """Per sharedness measure: the within-domain Spearman correlation with C2 accuracy
    (`clipmech.study.stats.correlation`) of the raw measure, "normalized" beside it when rows carry
    `{measure}_norm`, and "centred" (setup-centred) on the judged variant; "judged_by" names the
    variable finding 3 uses (`judged_measure` under the plan's `variant`)."""
    n_tests = len(SHAREDNESS_MEASURES)
    out = {}
    for k in SHAREDNESS_MEASURES:
        c = S.correlation(models, k, n_boot=n_boot, max_boot=max_boot, n_tests=n_tests, seed=seed)
        norm = judged_measure(models, k, "normalized")
        if norm != k:
            c["normalized"] = S.correlation(models, norm, n_boot=n_boot, max_boot=max_boot, n_tests=n_tests,
                                            seed=seed)
        judged = judged_measure(models, k, variant)
        c["centred"] = S.correlation(models, judged, centred=True, n_boot=n_boot, max_boot=max_boot, seed=seed)
        c["judged_by"] = judged
        c["reliability"] = measure_reliability(models, k)
        judged_rho = c.get("normalized", c)["rho"] if judged != k else c["rho"]
        c["rho_disattenuated"] = disattenuated(judged_rho, c["reliability"]["reliability"])
        out[k] = c
    return out


def measure_reliability(models: Sequence[Mapping[str, Any]], measure: str) -> dict[str, Any]:
    """`clipmech.study.measure_reliability.reliability` of `measure` over the rows, each row's SE from
    the class bootstrap of its per-class scores (`controls.nulls[measure].score.per_class`); rows
    without per-class scores count as dropped (reliability None with the reason when fewer than 3)."""
    return reliability([m.get(measure) for m in models], [row_score_se(m, measure) for m in models])


def assess_findings(models: Sequence[Mapping[str, Any]], correlations: Mapping[str, Mapping[str, Any]],
                    n_boot: int = S.DEFAULT_BOOT, seed: int = 0, max_boot: int = S.MAX_BOOT,
                    plan: Plan | None = None) -> list[dict[str, Any]]:
    """The paper's findings as the analysis `plan` (default: the shipped one) defines them, each with
    its evidence, multiple-comparison rule and verdict: the accuracy findings from their contrasts
    (rule "all": every contrast, Holm on the contradiction side; "one": the first contrast decides,
    `beside` contrasts reported with their label), finding 3 (rho > 0 per measure, Holm over the
    measures on both tails, on the plan's variant, `correlations_for`), then the causal finding
    (`assess_causal`). Verdicts: `clipmech.analysis.bootstrap.decide_family`."""
    plan = plan or load_plan()
    alpha = plan.data["alpha"]
    findings = []
    for spec in plan.data["findings"]:
        if spec["rule"] not in ("all", "one", "any"):
            continue
        pairs = spec["contrasts"]
        ev = [S.contrast(models, b, w, metric=spec.get("metric", "c2_test_acc"), n_boot=n_boot, max_boot=max_boot,
                         level=1 - alpha, n_tests=len(pairs), seed=seed) for b, w in pairs]
        for e in ev:
            e["diff"] = e["estimate"]
        _apply_rule(ev, spec["rule"], alpha)
        beside = []
        for extra in spec.get("beside", []):
            e = S.contrast(models, *extra["contrast"], metric=spec.get("metric", "c2_test_acc"), n_boot=n_boot,
                           max_boot=max_boot, level=1 - alpha, seed=seed)
            _apply_rule([e], "single", alpha)
            beside.append(e | {"label": extra["label"]})
        findings.append({"finding": spec["claim"], "id": spec["id"], "side": spec.get("side"), "mode": spec["rule"],
                         "rule": RULES[spec["rule"]], "evidence": ev, "beside": beside,
                         "verdict": _combine([e["verdict"] for e in ev], "any" if spec["rule"] == "any" else "all")})
    ev = []
    for k, c in correlations.items():
        judged = c.get("normalized", c) if c["judged_by"] != k else c
        ev.append({**{f: v for f, v in judged.items() if f not in ("centred", "normalized")}, "measure": k,
                   "reliability": c.get("reliability"), "rho_disattenuated": c.get("rho_disattenuated"),
                   "judged_by": c["judged_by"], "raw": {f: c[f] for f in ("rho", "ci_low", "ci_high", "p_star")},
                   "centred": {f: c["centred"].get(f) for f in ("rho", "ci_low", "ci_high", "p_star", "p_star_se")}})
    _apply_rule(ev, "holm_measures", alpha)
    findings.append({"finding": SHAREDNESS_FINDING, "mode": "all", "rule": RULES["holm_measures"], "evidence": ev,
                     "verdict": _combine([e["verdict"] for e in ev], "all")})
    matched = assess_causal(models, n_boot=n_boot, seed=seed, max_boot=max_boot, alpha=alpha)
    placebo = assess_causal_test(models, plan)
    findings.append(placebo | {"matched_test": matched} if placebo else matched)
    return findings


def assess_causal_test(models: Sequence[Mapping[str, Any]], plan: Plan) -> dict[str, Any] | None:
    """The causal finding under the plan's placebo rule, from rows carrying `controls.causal_test`
    (`clipmech.study.causal.study_causal_test`): `clipmech.analysis.causal.causal_finding` on the
    plan's ablation and outcome decides (sign-flip over classes, side stated); the other ablations
    and outcomes are reported beside. None when no row carries the test (the matched test decides)."""
    tests = [t for m in models if (t := (m.get("controls") or {}).get("causal_test")) and t.get("classes")]
    if not tests:
        return None
    spec = plan.finding("causal")
    alpha, k = plan.data["alpha"], spec.get("min_classes", 8)
    primary = causal_finding(tests, spec["ablation"], spec["outcome"], alpha, k)
    beside = [causal_finding(tests, a, o, alpha, k) | {"label": "reported beside, not judged"}
              for a in [spec["ablation"], *spec.get("ablations_beside", [])]
              for o in [spec["outcome"], *spec.get("outcomes_beside", [])]
              if (a, o) != (spec["ablation"], spec["outcome"])]
    return {"finding": spec["claim"], "id": spec["id"], "side": spec["side"], "mode": "sign_flip",
            "rule": (f"per class, (shared − controls) − (placebo − controls) averaged over the models ({len(tests)} rows)"
                     f"; exact one-sided sign-flip test over classes, reproduced when p < α/2"),
            "evidence": [primary], "beside": beside,
            "balance": balance_summary(tests, spec["ablation"], spec["outcome"], spec.get("balance_limit", BALANCE_LIMIT)),
            "coverage": "classes are the exchangeable units of the sign-flip test; models are averaged within "
                        "each class, so the p-value covers the choice of classes, not of models or drawings.",
            "verdict": primary["verdict"]}


def assess_causal(models: Sequence[Mapping[str, Any]], n_boot: int = S.DEFAULT_BOOT, seed: int = 0,
                  max_boot: int = S.MAX_BOOT, alpha: float = ALPHA) -> dict[str, Any]:
    """The causal finding over models: the mean paired effect on the true-class logit (shared minus
    matched-control drop, `clipmech.study.stats.causal_effects`) decides under the p* rule; the
    accuracy effect, each setup's effects (unadjusted, descriptive) and the rows' trimmed fractions
    are reported beside. "not measured" when no row carries per-class causal effects."""
    def effects(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {w: S.causal_effects(rows, w, n_boot=n_boot, max_boot=max_boot, level=1 - alpha, seed=seed)
               for w in ("logit", "accuracy")}
        _apply_rule(list(out.values()), "single", alpha)
        return out

    pooled = effects(models)
    setups = list(dict.fromkeys(m["setup"] for m in models))
    per_setup = ({s: effects([m for m in models if m["setup"] == s]) for s in setups}
                 if pooled["logit"]["n_rows"] else {})
    trimmed = [m["controls"]["causal"]["trimmed_fraction"] for m in models
               if _is_number(((m.get("controls") or {}).get("causal") or {}).get("trimmed_fraction"))]
    return {"finding": CAUSAL_FINDING, "mode": "all", "rule": RULES["single"], "evidence": [pooled["logit"]],
            "accuracy": pooled["accuracy"], "per_setup": {s: e for s, e in per_setup.items() if e["logit"]["n_rows"]},
            "trimmed_fraction": {"mean": float(np.mean(trimmed)), "min": min(trimmed), "max": max(trimmed),
                                 "n_rows": len(trimmed)} if trimmed else None,
            "verdict": _combine([pooled["logit"]["verdict"]], "all")}


def power(models: Sequence[Mapping[str, Any]], n_boot: int = S.DEFAULT_BOOT, seed: int = 0,
          class_counts: Sequence[int] | None = None) -> dict[str, Any]:
    """Achieved 95% CI half-width of each main contrast (pooled over test domains) against
    POWER_TARGET, and the pilot curve: half-widths when only the first k C2 classes are used.

    Returns {"target", "half_width": {contrast: hw}, "met", "pilot": {"n_classes": [k...],
    contrast: [hw...]}}; a fixed `n_boot` (not adaptive) so curve points are comparable.
    """
    classes, _, per_class = S.class_table(models)
    out: dict[str, Any] = {"target": POWER_TARGET, "half_width": {}, "n_boot": n_boot}
    for b, w in MAIN_CONTRASTS:
        c = S.contrast(models, b, w, n_boot=n_boot, max_boot=n_boot, seed=seed)
        out["half_width"][f"{b} - {w}"] = None if c["ci_low"] is None else (c["ci_high"] - c["ci_low"]) / 2
    hw = list(out["half_width"].values())
    out["met"] = bool(hw and all(h is not None and h <= POWER_TARGET for h in hw))
    if per_class and len(classes) >= 4:
        ks = class_counts or sorted({k for k in (5, 10, 15, 20, 30, 45, 60, 90, 120) if k < len(classes)}
                                    | {len(classes)})
        pilot: dict[str, Any] = {"n_classes": list(ks)}
        for b, w in MAIN_CONTRASTS:
            pts = [S.contrast(models, b, w, n_boot=n_boot, max_boot=n_boot, seed=seed, classes=classes[:k])
                   for k in ks]
            pilot[f"{b} - {w}"] = [None if c["ci_low"] is None else (c["ci_high"] - c["ci_low"]) / 2 for c in pts]
        out["pilot"] = pilot
    return out


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ValueError listing every way `results` departs from the schema (SCHEMA_VERSION)."""
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
            if m[f] is None and (m.get("null_reasons") or {}).get(f):
                continue  # not computable, and the row says why
            if not _is_number(m[f]) or not -1.0 <= m[f] <= 1.0:
                problems.append(f"models[{i}].{f} = {m[f]!r} is not a finite number in [-1, 1] (a null needs "
                                "its reason in null_reasons)")
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
    if not isinstance(results.get("provenance", {}), dict):
        problems.append("'provenance' must be an object (docs/results_schema.md)")
    if problems:
        raise ValueError(f"results.json does not match schema version {SCHEMA_VERSION}: " + "; ".join(problems))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_results(models: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None, n_boot: int = S.DEFAULT_BOOT, boot_seed: int = 0,
                  max_boot: int = S.MAX_BOOT, plan: Plan | None = None,
                  provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The results.json object from per-model rows: the one entry point of the quickstart, the
    paper-scale `experiment analyse` and `clipmech report`.

    `models`: one dict per (trained model, test domain) with MODEL_FIELDS, optionally `model_id`
    (derived from setup and seed when absent: natural-only is one model per seed),
    `{c1,c2}_test_acc_per_class` ({class: accuracy}; enables class resampling) and
    `{measure}_norm` (judged by finding 3 when every row has it). Adds "correlations" (per measure),
    "findings" (verdicts) and "power" (CI half-widths and pilot curve). `n_boot` resamples to start
    with, doubled while a decision is within 2 Monte-Carlo SEs of its threshold, up to `max_boot`;
    `boot_seed` seeds them (verdicts do not depend on it but near a threshold). `plan`: the analysis
    plan judging the findings (default: the shipped one); results["plan"] records its version, hash
    and whether the verdicts are confirmatory (`clipmech.study.analysis_plan.Plan.status`).
    `provenance`: clipmech.study.provenance's block ({} when unknown). Cost: seconds. Schema:
    docs/results_schema.md.
    """
    plan = plan or load_plan()
    models = [dict(m) | {"model_id": S.model_id(m)} for m in models]
    variant = plan.finding("sharedness").get("variant", "normalized")
    correlations = correlations_for(models, n_boot=n_boot, seed=boot_seed, max_boot=max_boot, variant=variant)
    results = {"schema_version": SCHEMA_VERSION, "provenance": dict(provenance or {}),
               "config": dict(config or {}), "models": models,
               "correlations": correlations,
               "findings": assess_findings(models, correlations, n_boot=n_boot, seed=boot_seed, max_boot=max_boot,
                                           plan=plan),
               "power": power(models, seed=boot_seed),
               "plan": plan.record(m["seed"] for m in models),
               "statistics": {"alpha": plan.data["alpha"], "n_boot": n_boot, "max_boot": max_boot,
                              "boot_seed": boot_seed, "mc_level": B.MC_LEVEL},
               "extra": dict(extra or {})}
    validate_results(results)
    return results


def recompute(results: Mapping[str, Any], n_boot: int = S.DEFAULT_BOOT, boot_seed: int = 0,
              plan: Plan | None = None) -> dict[str, Any]:
    """`build_results` again from a stored results dict's per-model rows, config and extra (no
    training or analysis), under `plan` (default: the shipped one): what `clipmech report RUN_DIR
    [--plan FILE]` writes. Accepts schema 1 files (their rows get a derived `model_id`)."""
    if not isinstance(results.get("models"), list) or not results["models"]:
        raise ValueError("results.json has no 'models' rows to recompute the statistics from")
    return build_results(results["models"], results.get("config"), results.get("extra"), n_boot=n_boot,
                         boot_seed=boot_seed, plan=plan, provenance=results.get("provenance"))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _ci(e: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if e.get("ci_low") is None:
        return "no CI"
    return f"[{scale * e['ci_low']:.{digits}f}, {scale * e['ci_high']:.{digits}f}]"


def setup_summary(models: Iterable[Mapping[str, Any]], n_boot: int = S.DEFAULT_BOOT, seed: int = 0
                  ) -> dict[str, dict[str, Any]]:
    """Per setup: mean C1/C2 accuracy over test domains, seeds and classes with a 95% percentile CI
    from the crossed seed x class bootstrap (`clipmech.study.stats.contrast` with worse=None)."""
    rows = list(models)
    out = {}
    for setup in dict.fromkeys(m["setup"] for m in rows):
        mine = [m for m in rows if m["setup"] == setup]
        entry: dict[str, Any] = {"n": len({S.model_id(m) for m in mine})}
        for f in ACCURACY_FIELDS:
            c = S.contrast(mine, setup, None, metric=f, n_boot=n_boot, max_boot=n_boot, seed=seed)
            entry[f] = {"mean": float(np.mean([m[f] for m in mine])) if c["estimate"] is None else c["estimate"],
                        "ci_low": c["ci_low"], "ci_high": c["ci_high"]}
        out[setup] = entry
    return out


def render_report(results: Mapping[str, Any], figures: Mapping[str, str] | None = None) -> str:
    """report.md text: setup table, findings with verdicts, correlations, figures, caveats."""
    cfg = results.get("config", {})
    lines = ["# clipmech study report", ""]
    if cfg:
        lines += ["Configuration: " + ", ".join(f"{k} = `{v}`" for k, v in sorted(cfg.items())
                                               if not isinstance(v, (dict, list))), ""]
    if cfg.get("circuit_method", "paper_ig") != "paper_ig":
        lines += [f"**Circuits were discovered with `{cfg['circuit_method']}`, not the analysis plan's method (the "
                  "paper's IG): every circuit-based measure, control and causal verdict below is exploratory** "
                  "(docs/circuit_validity.md).", ""]
    lines += ["## Accuracy per setup", "",
              "Class-balanced zero-shot top-1 (%) on the test domain; mean over test domains, seeds and "
              "classes with a 95% CI from the crossed seed × class bootstrap. C2 = held-out classes, "
              "C1 = the others; models = distinct trained models.", "",
              "| setup | models | C1 accuracy | C2 accuracy |", "|---|---|---|---|"]
    summary = setup_summary(results["models"])
    order = [s for s in MAIN_SETUPS if s in summary] + [s for s in summary if s not in MAIN_SETUPS]
    for s in order:
        e = summary[s]
        lines.append(f"| {s} | {e['n']} | {_pct(e['c1_test_acc']['mean'])} {_ci(e['c1_test_acc'])} "
                     f"| {_pct(e['c2_test_acc']['mean'])} {_ci(e['c2_test_acc'])} |")
    lines += ["", "## The paper's findings", "",
              "Verdict rule (fixed in advance, `clipmech.analysis.bootstrap.decide`): p* = P*(effect* < 0) + "
              "½ P*(effect* = 0) is the bootstrap probability that the effect does not have the paper's sign, "
              "[lo, hi] its exact 99 % Monte-Carlo (Clopper–Pearson) interval. *reproduced* when hi < α/2 "
              "(α = 0.05), *contradicted* when the opposite tail's hi does the same, *inconclusive (borderline)* "
              "when α/2 lies in either interval, otherwise *inconclusive*; p̂ = 0 is written \"< 1/B\" with its "
              "bound. Holm's correction applies to the side each rule names. Resamples are added until every decision is clear of its band (or "
              "the cap is reached), so the verdicts do not depend on the bootstrap seed. The 95% percentile "
              "CI is shown beside. Contrasts: mean over test domains of the mean over seeds and C2 classes; "
              "seeds and classes are resampled independently (one class draw for every model). "
              "Correlations: Spearman ρ within each test domain, averaged over domains; trained models are "
              "resampled as clusters. Causal effects: per C2 class, the drop of the held-out true-class logit "
              "after ablating the circuit nodes shared with other domains minus the drop after ablating "
              "IG-matched controls; mean over test domains, models and classes, models (as clusters) and "
              "classes resampled independently.", ""]
    plan = results.get("plan")
    if plan:
        lines += [f"Analysis plan v{plan['version']} ({plan['source']}, sha256 {plan['sha256']}): verdicts are "
                  f"**{plan['status']}**.", ""]
    for f in results["findings"]:
        side = f" Side: {f['side']}." if f.get("side") else ""
        lines += [f"### {f['finding']}: **{f['verdict']}**", "", f"Rule: {f['rule']}.{side}", ""]
        lines += [_evidence_line(e) for e in f["evidence"]] + _causal_beside(f)
        lines += [_evidence_line(e, f"beside ({e['label']}): ") for e in f.get("beside", [])]
        lines += _balance_lines(f.get("balance"))
        if f.get("matched_test"):
            lines += [_evidence_line(e, "beside (matched test of issue 13): ") for e in f["matched_test"]["evidence"]]
        lines += ["", f"*What the CIs cover:* {f.get('coverage') or ci_coverage(f, cfg)}", ""]
    lines += _power_lines(results.get("power"))
    lines += ["## Models", "", "| setup | test domain | seed | C1 % | C2 % | " +
              " | ".join(SHAREDNESS_MEASURES) + " |", "|---" * (5 + len(SHAREDNESS_MEASURES)) + "|"]
    for m in results["models"]:
        lines.append(f"| {m['setup']} | {m['test_domain']} | {m['seed']} | {_pct(m['c1_test_acc'])} | "
                     f"{_pct(m['c2_test_acc'])} | " +
                     " | ".join("n/a" if m[k] is None else f"{m[k]:.3f}" for k in SHAREDNESS_MEASURES) + " |")
    lines += _null_lines(results["models"])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"- `{name}`: {desc}" for name, desc in figures.items()]
    scale = ("- Tiny models on the embedded emoji domains: the numbers test whether the paper's "
             "*qualitative* findings appear at toy scale; they are not comparable to the paper's "
             "DomainNet accuracies." if cfg.get("dataset") == "emoji" else
             "- The numbers are comparable to the paper's only where model, data, training budget and "
             "seeds match its runs (see the configuration above and each run's config.toml).")
    lines += ["", "## Caveats", "", scale,
              "- Correlations are correlational, not causal; the setup-centred ρ shows whether the link "
              "holds beyond the differences between setups.",
              "- A normalised sharedness above 1 means the score exceeded its ceiling: the ceiling (agreement of "
              "circuits from disjoint drawings, pooled over every domain) is then not a ceiling for the score's "
              "domain pairs; `ceiling_pairs` in the controls is the same-pairs ceiling.", ""]
    return "\n".join(lines)


def _null_lines(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (measure, reason) that left a field null in some rows, with the rows it hit."""
    hits: dict[tuple[str, str], list[str]] = {}
    for m in models:
        for field, reason in (m.get("null_reasons") or {}).items():
            hits.setdefault((field, reason), []).append(f"{m['setup']}/{m['test_domain']}/s{m['seed']}")
    if not hits:
        return []
    return ["", "Not computed (null in results.json; the other measures are unaffected):", ""] + [
        f"- `{field}` in {len(rows)} row(s) ({', '.join(rows[:4])}{' ...' if len(rows) > 4 else ''}): {reason}"
        for (field, reason), rows in hits.items()]


def _p(e: Mapping[str, Any]) -> str:
    if e.get("p_star") is None:
        return "no p*"
    adj = "" if e.get("p_adjusted") == e["p_star"] else f", Holm-adjusted {e['p_adjusted']:.4f}"
    q = 1 - e["p_star"]
    if e.get("p_opposite_adjusted") is not None and not math.isclose(e["p_opposite_adjusted"], q):
        adj += f", opposite tail Holm-adjusted {e['p_opposite_adjusted']:.4f}"
    text = e.get("p_text") or B.format_p(e["p_star"], int(e.get("n_boot_valid") or e["n_boot"]))
    return f"{text}{adj}, B = {e['n_boot']}"


def _evidence_line(e: Mapping[str, Any], label: str = "") -> str:
    """One bullet of a finding: estimate, CI, p*, sizes and verdict (`label` prefixes a causal one)."""
    if "outcome" in e:
        return _placebo_line(e, label)
    if "what" in e:
        if e.get("estimate") is None:
            return f"- {label}{e['what']} effect: not measured ({e['reason']}): **{e['verdict']}**"
        return (f"- {label}{e['what']} effect (shared − matched-control drop) = {_effect(e)}, {_p(e)}, "
                f"{e['n_models']} models ({e['n_rows']} rows), {e['n_classes']} C2 classes, {e['n_domains']} test "
                f"domain(s): **{e['verdict']}**")
    if "measure" in e:
        rho = "n/a" if e.get("rho") is None else f"{e['rho']:.2f}"
        why = f" ({e['reason']})" if e.get("reason") else ""
        judged = f" judged by {e['judged_by']}, raw ρ = {e['raw']['rho']:.2f};" if e["judged_by"] != e["measure"] \
            and e["raw"]["rho"] is not None else ""
        c = e.get("centred") or {}
        centred = "" if c.get("rho") is None else f"; setup-centred ρ = {c['rho']:.2f} {_ci(c, 1.0, 2)}"
        rel = e.get("reliability") or {}
        if rel.get("reliability") is not None:
            centred += (f"; reliability {rel['reliability']:.2f}" + (" (FLAGGED: below 0.5)" if rel["flagged"] else "")
                        + ("" if e.get("rho_disattenuated") is None else
                           f", ρ corrected for attenuation {e['rho_disattenuated']:.2f}"))
        elif rel:
            centred += f"; reliability n/a ({rel['reason']})"
        return (f"- Spearman ρ({e['measure']}, C2 accuracy) = {rho} {_ci(e, 1.0, 2)},{judged} {_p(e)}, "
                f"{e['n_models']} models ({e['n']} rows) in {e.get('n_domains', 0)} test domain(s){why}"
                f"{centred}: **{e['verdict']}**")
    diff = "n/a" if e.get("estimate") is None else f"{100 * e['estimate']:+.1f}"
    classes = f", {e['n_classes']} C2 classes" if e.get("n_classes") else ""
    return (f"- {label}C2 accuracy {e['better']} − {e['worse']} = {diff} points {_ci(e)}, {_p(e)}, "
            f"{e['n_models']} models, {e['n_seeds']} seed(s){classes}, {e['n_domains']} test domain(s): "
            f"**{e['verdict']}**")


def _placebo_line(e: Mapping[str, Any], label: str = "") -> str:
    """One bullet of the placebo causal test (`clipmech.analysis.causal.causal_finding`)."""
    head = f"- {label}{e['ablation']} ablation, {e['outcome']}: "
    excluded = ", ".join(f"{n} {why}" for why, n in e["excluded"].items() if n) or "none"
    if e.get("p") is None:
        return head + f"not measured (excluded (model, class) pairs: {excluded}): **{e['verdict']}**"
    strata = "; ".join(f"stratum {z}: {_signed(v['effect'])} ({v['unmatched']} of {v['size']} unmatched)"
                       for z, v in e["strata"].items())
    warn = f" ({e['warning']})" if e.get("warning") else ""
    return (head + f"primary contrast {e['estimate']:+.3f} over {e['n_classes']} classes, sign-flip p = "
            f"{e['p']:.4f} (side {e['side']}; smallest attainable {e['min_p']:.4f}){warn}; shared − controls "
            f"{e['shared_minus_controls']:+.3f}, mean randomisation p {e['randomisation_p']:.3f}; by IG stratum "
            f"(top last): {strata}; excluded (model, class) pairs: {excluded}: **{e['verdict']}**")


def _balance_lines(b: Mapping[str, Any] | None) -> list[str]:
    """The causal test's balance check over all (model, class) pairs (`balance_summary`)."""
    if not b or not b["n_pairs"]:
        return []
    q = b["shared_smd_quartiles"]
    quart = "n/a" if q is None else f"{q[1]:+.2f} (quartiles {q[0]:+.2f}, {q[2]:+.2f})"
    share = (lambda v: "n/a" if v is None else f"{100 * v:.0f} %")
    strata = "; ".join(f"stratum {z}: {v['effect']:+.3f} (n = {v['n']})" for z, v in b["strata_all_pairs"].items())
    placebo = "n/a" if b["placebo_abs_smd_median"] is None else f"{b['placebo_abs_smd_median']:.2f}"
    return (["", f"Balance check ({b['ablation']} ablation, {b['outcome']}; |SMD| of independent IG ≤ {b['limit']}): "
            f"{b['n_balanced']} of {b['n_pairs']} (model, class) pairs balanced; shared set SMD median {quart}, "
            f"positive in {share(b['shared_positive'])}, within the limit in {share(b['shared_within_limit'])} "
            f"(positive: the shared nodes have higher IG on independent drawings than their matched controls); "
            f"placebo sets' median |SMD| {placebo}; {b['infinite']} infinite SMD(s) counted as unbalanced.",
            f"Shared − controls by IG stratum over all pairs, balanced or not (exploratory; top last): {strata or 'n/a'}."]
            + _randomisation_line(b.get("randomisation_all_pairs")))


def _randomisation_line(r: Mapping[str, Any] | None) -> list[str]:
    """The randomisation null over all pairs (`balance_summary`); nothing for results written before it."""
    if not r or not r["n"]:
        return []
    sets = "/".join(str(n) for n in r["n_null"])
    return [f"Randomisation null over all pairs, balanced or not (exploratory): the shared set's drop ranked among "
            f"its {sets} matched random sets gives a one-sided rank p (side: the shared drop larger) with median "
            f"{r['median_p']:.3f}; p ≤ 0.05 in {100 * r['share_p_le_0.05']:.0f} % of {r['n']} pairs."]


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _effect(e: Mapping[str, Any]) -> str:
    """A causal effect with its CI: the logit in cosine units, accuracy in points."""
    if e.get("estimate") is None:
        return "n/a"
    if e["what"] == "accuracy":
        return f"{100 * e['estimate']:+.1f} points {_ci(e)}"
    return f"{e['estimate']:+.3f} {_ci(e, 1.0, 3)}"


def _causal_beside(f: Mapping[str, Any]) -> list[str]:
    """The causal finding's lines beside its verdict: accuracy effect, trimmed fraction, setups."""
    if "accuracy" not in f or f["evidence"][0].get("estimate") is None:
        return []
    lines = [_evidence_line(f["accuracy"], "reported beside: C2 ")]
    t = f.get("trimmed_fraction")
    if t:
        lines.append(f"- shared nodes trimmed for lack of an IG-matched control: {100 * t['mean']:.0f} % on average "
                     f"(range {100 * t['min']:.0f}-{100 * t['max']:.0f} % over {t['n_rows']} rows)")
    if f.get("per_setup"):
        lines += ["", "Per setup (descriptive: each p* unadjusted, verdicts not combined):", "",
                  "| setup | models | logit effect | p* | verdict | accuracy effect |", "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {e['logit']['n_models']} | {_effect(e['logit'])} | {_p(e['logit'])} | "
                  f"{e['logit']['verdict']} | {_effect(e['accuracy'])} |" for s, e in f["per_setup"].items()]
    return lines


def ci_coverage(finding: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """One sentence: what a finding's CIs resample and what they leave out."""
    ev = [e for e in finding["evidence"] if e.get("p_star") is not None]
    if not ev:
        first = finding["evidence"][0] if finding["evidence"] else {}
        if first.get("reason"):
            return f"not measured: {first['reason']}."
        return ("no CI: nothing to resample (one model and one class)." if "what" in first else
                "no CI: nothing to resample (one seed and no per-class accuracies).")
    e = ev[0]
    domains = config.get("test_domains")
    fixed = f"the test domains ({', '.join(domains)}) are fixed, not sampled" if domains else \
        "the test domains are fixed, not sampled"
    drawings = config.get("c2_drawings_per_cell")
    per = f", {drawings} distinct drawing(s) per class and test domain" if drawings else ""
    if "what" in e:
        how = ", drawn independently" if len(e["resampled"]) == 2 else ""
        return (f"covers {' and '.join(e['resampled'])}{how} ({e['n_models']} trained models as "
                f"clusters: a model scored on two test domains is drawn once; {e['n_classes']} C2 classes, one "
                f"class draw for every model). Not covered: {fixed}; within a model, the choice of discovery "
                f"and held-out drawings and of the matched controls (averaged over draws); other datasets, model "
                f"sizes and budgets.")
    if "measure" in e:
        covers = f"{e['n_models']} trained models resampled as clusters" + (
            f" and {e['n_classes']} C2 classes (accuracy side{per})" if "classes" in e["resampled"] else "")
        return (f"covers {covers}. Not covered: {fixed}; the sharedness measures' own noise within a model "
                f"(circuit classes, SAE training) and other datasets, model sizes and budgets.")
    parts = []
    if "seeds" in e["resampled"]:
        parts.append(f"{e['n_seeds']} training seeds (training randomness)")
    if "classes" in e["resampled"]:
        parts.append(f"{e['n_classes']} C2 classes{per} (which classes and images are held out)")
    missing = "" if "seeds" in e["resampled"] else "training randomness (one seed); "
    return (f"covers {' and '.join(parts)}. Not covered: {missing}{fixed}; other datasets, model sizes "
            f"and training budgets.")


def _power_lines(pw: Mapping[str, Any] | None) -> list[str]:
    """The power section: achieved half-widths against the target and the pilot curve."""
    if not pw:
        return []
    hw = ", ".join(f"{k}: {'n/a' if v is None else f'{100 * v:.1f}'}" for k, v in pw["half_width"].items())
    lines = ["## Power", "",
             f"95% CI half-width of each main C2 contrast, pooled over test domains (points; target ≤ "
             f"{100 * pw['target']:.0f}): {hw} — target {'met' if pw['met'] else 'NOT met'}.", ""]
    pilot = pw.get("pilot")
    if pilot:
        names = [k for k in pilot if k != "n_classes"]
        lines += ["Pilot curve: half-width (points) using only the first k C2 classes.", "",
                  "| k | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, k in enumerate(pilot["n_classes"]):
            lines.append(f"| {k} | " + " | ".join("n/a" if pilot[n][i] is None else f"{100 * pilot[n][i]:.1f}"
                                                 for n in names) + " |")
        lines.append("")
    return lines


def write_outputs(results: Mapping[str, Any], out_dir: PathLike,
                  figures: Mapping[str, str] | None = None) -> None:
    """Validate and write results.json and report.md into `out_dir` atomically. `figures`
    ({path: description}) are listed in the report and kept in results["extra"]["figures"], so a
    later `clipmech report` lists them again."""
    from pathlib import Path

    validate_results(results)
    figures = figures if figures is not None else results.get("extra", {}).get("figures")
    if figures:
        results = {**results, "extra": {**results.get("extra", {}), "figures": dict(figures)}}
    out = Path(out_dir)
    atomic_write_json(results, out / "results.json")
    atomic_write_text(render_report(results, figures), out / "report.md")
