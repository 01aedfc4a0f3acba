"""Every field the view reads from a study's `results.json` and `report.md`, in one module.

The results schema is still growing (versioned by `schema_version`; per-run rows are being made
uniform), so every access here is defensive: a missing or malformed field becomes `None` and the
page shows "not measured" instead of failing. When the schema changes, this is the one file to
update. Nothing is computed: numbers are only picked out and formatted for display (accuracies and
contrasts in percentage points, correlations and logit effects as they are).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

NOT_MEASURED = "not measured"
# Sharedness scores a model row may carry; each may have _floor / _ceiling / _norm companions and a
# controls.nulls entry (score CI, untrained floor). Unknown extra scores are shown when present.
MEASURES = ("cka_mid", "node_jaccard", "edge_jaccard", "wl", "feature_sharing")


def get(obj: Any, *path: str | int) -> Any:
    """obj[path[0]][path[1]]..., or None where any step is missing or of the wrong type."""
    for step in path:
        if isinstance(obj, Mapping) and isinstance(step, str):
            obj = obj.get(step)
        elif (isinstance(obj, Sequence) and not isinstance(obj, str) and isinstance(step, int)
              and -len(obj) <= step < len(obj)):
            obj = obj[step]
        else:
            return None
    return obj


def number(v: Any) -> float | None:
    """A finite float, or None (missing, NaN, infinite, a string)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def fmt(v: Any, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """A number for display, or NOT_MEASURED."""
    x = number(v)
    if x is None:
        return NOT_MEASURED
    return f"{x * scale:{'+' if sign else ''}.{digits}f}"


def fmt_ci(lo: Any, hi: Any, digits: int = 3, scale: float = 1.0) -> str:
    """'[lo, hi]', or '' when either end is missing."""
    a, b = number(lo), number(hi)
    return "" if a is None or b is None else f"[{a * scale:.{digits}f}, {b * scale:.{digits}f}]"


# ------------------------------------------------------------------------------------ findings
def _evidence(e: Mapping[str, Any]) -> dict[str, Any]:
    """One piece of a finding's evidence: what it tests, its estimate with CI, p* and verdict."""
    if "what" in e:  # causal: shared minus matched-control drop
        points = e.get("what") == "accuracy"
        label = f"{e.get('what')} effect (shared − matched-control drop)"
    elif "measure" in e:  # correlation with C2 accuracy
        points = False
        judged = e.get("judged_by")
        label = f"Spearman ρ({e.get('measure')}, C2 accuracy)"
        label += f", judged by {judged}" if judged and judged != e.get("measure") else ""
    else:  # contrast between two setups
        points = True
        label = f"C2 accuracy {e.get('better', '?')} − {e.get('worse', '?')}"
    scale, digits = (100.0, 1) if points else (1.0, 3)
    estimate = e.get("estimate", e.get("rho"))
    unit = " points" if points and number(estimate) is not None else ""
    adjusted = number(e.get("p_adjusted")) is not None and e.get("p_adjusted") != e.get("p_star")
    return {"label": label, "estimate": fmt(estimate, digits, scale, sign=True) + unit,
            "ci": fmt_ci(e.get("ci_low"), e.get("ci_high"), digits, scale),
            "p": fmt(e.get("p_star"), 4) + ("" if number(e.get("p_star_se")) is None else f" ± {e['p_star_se']:.4f}")
            + (f" (Holm-adjusted {e['p_adjusted']:.4f})" if adjusted else ""), "n_models": e.get("n_models"),
            "verdict": e.get("verdict") or NOT_MEASURED, "reason": e.get("reason")}


def findings(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{"finding", "verdict", "rule", "evidence": [...]}] in the results' order."""
    out = []
    for f in results.get("findings") or []:
        if not isinstance(f, Mapping):
            continue
        evidence = [_evidence(e) for e in f.get("evidence") or [] if isinstance(e, Mapping)]
        if isinstance(f.get("accuracy"), Mapping):  # the causal finding's accuracy effect, reported beside
            evidence.append(_evidence(f["accuracy"]) | {"beside": True})
        out.append({"finding": str(f.get("finding", "unnamed finding")), "verdict": f.get("verdict") or NOT_MEASURED,
                    "rule": f.get("rule") or "", "evidence": evidence})
    return out


# ------------------------------------------------------------------------------------ accuracy
def accuracy_table(results: Mapping[str, Any], report_md: str | None) -> dict[str, Any] | None:
    """The per-setup accuracy table {"columns", "rows"}: from results["accuracy"] when the results
    carry it ({setup: {"n", metric: {"mean", "ci_low", "ci_high"}}}), else the table under
    report.md's "Accuracy per setup" heading; None when neither has it."""
    table = results.get("accuracy")
    if isinstance(table, Mapping) and table:
        rows = []
        for setup, e in table.items():
            cells = [str(setup), str(get(e, "n") or "")]
            for metric in ("c1_test_acc", "c2_test_acc"):
                ci = fmt_ci(get(e, metric, "ci_low"), get(e, metric, "ci_high"), 1, 100)
                cells.append(f"{fmt(get(e, metric, 'mean'), 1, 100)} {ci}".strip())
            rows.append(cells)
        return {"columns": ["setup", "models", "C1 accuracy", "C2 accuracy"], "rows": rows}
    return markdown_table(report_md or "", "Accuracy per setup")


def markdown_table(md: str, heading: str) -> dict[str, Any] | None:
    """The first pipe table after the heading named `heading`, {"columns", "rows"}, or None."""
    m = re.search(rf"^#+\s*{re.escape(heading)}\s*$(.*?)(?=^#|\Z)", md, flags=re.M | re.S)
    lines = [ln.strip() for ln in (m.group(1) if m else "").splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return None
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {"columns": split[0], "rows": [r for r in split[2:] if len(r) == len(split[0])]}


# ------------------------------------------------------------------------------------ models
def has_rows(results: Any) -> bool:
    """Whether `results` is a study's results: a table with a list of per-model rows ("models")."""
    return isinstance(results, Mapping) and isinstance(results.get("models"), list)


def model_rows(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The results' per-(model, test domain) rows that name their model."""
    return [m for m in results.get("models") or [] if isinstance(m, Mapping) and (m.get("model_id") or m.get("run_id"))]


def unnamed_rows(results: Mapping[str, Any]) -> int:
    """How many rows `model_rows` leaves out (not a table, or naming no model): the page says so."""
    return len(results.get("models") or []) - len(model_rows(results))


def model_id(row: Mapping[str, Any]) -> str:
    return str(row.get("model_id") or row.get("run_id"))


def measures_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sharedness measures present in any row: MEASURES first, then others with a _norm companion."""
    present = [m for m in MEASURES if any(m in r for r in rows)]
    extra = sorted({k[:-5] for r in rows for k in r if k.endswith("_norm") and k[:-5] not in present and k[:-5] in r})
    return present + extra


def measure(row: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One sharedness score of a row with its floor, ceiling, normalised value, the score's CI over
    classes and the untrained model's score (the reliability context); None where not measured."""
    nulls = get(row, "controls", "nulls", name) or {}
    return {"score": number(row.get(name)), "floor": number(row.get(f"{name}_floor")),
            "ceiling": number(row.get(f"{name}_ceiling")), "norm": number(row.get(f"{name}_norm")),
            "ci": [number(get(nulls, "score", "ci", 0)), number(get(nulls, "score", "ci", 1))],
            "untrained": number(get(nulls, "floor_untrained", "mean")),
            "norm_reason": get(row, "controls", "norm_reasons", name)}


def model_summary(row: Mapping[str, Any], measures: Sequence[str]) -> dict[str, Any]:
    """A row for the study's model table."""
    return {"model_id": model_id(row), "setup": row.get("setup"), "seed": row.get("seed"),
            "test_domain": row.get("test_domain"), "c1": number(row.get("c1_test_acc")),
            "c2": number(row.get("c2_test_acc")), "causal_verdict": row.get("causal_verdict") or NOT_MEASURED,
            "measures": {m: measure(row, m) for m in measures}}


def causal(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's causal test: logit and accuracy effects with CIs, verdict, trimmed fraction, per class."""
    per_class = get(row, "controls", "causal", "per_class") or {}
    return {"verdict": row.get("causal_verdict") or get(row, "controls", "causal", "verdict", "verdict") or NOT_MEASURED,
            "logit": fmt(row.get("causal_effect_logit"), 3, sign=True),
            "logit_ci": fmt_ci(get(row, "causal_effect_logit_ci", 0), get(row, "causal_effect_logit_ci", 1)),
            "accuracy": fmt(row.get("causal_effect_accuracy"), 1, 100, sign=True),
            "accuracy_ci": fmt_ci(get(row, "causal_effect_accuracy_ci", 0), get(row, "causal_effect_accuracy_ci", 1),
                                  1, 100),
            "p": fmt(get(row, "controls", "causal", "verdict", "p_star"), 4),
            "trimmed": fmt(row.get("causal_trimmed_fraction"), 0, 100),
            "ablation": get(row, "controls", "causal", "ablation"),
            "per_class": {str(c): {"logit": number(get(v, "effect_logit")), "accuracy": number(get(v, "effect_accuracy")),
                                   "n_shared": get(v, "n_shared"), "n_images": get(v, "n_images")}
                          for c, v in per_class.items() if isinstance(v, Mapping)}}


def faithfulness(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"sizes": [...], "domains": {domain: {ablation: {"auc", "auc_ci", "f": [...]}}}} or None."""
    faith = get(row, "controls", "faithfulness")
    if not isinstance(faith, Mapping) or not isinstance(faith.get("domains"), Mapping):
        return None
    domains = {}
    for d, per in faith["domains"].items():
        domains[str(d)] = {str(a): {"auc": number(get(v, "auc", "mean")),
                                    "auc_ci": [number(get(v, "auc", "ci", 0)), number(get(v, "auc", "ci", 1))],
                                    "f": [number(x) for x in get(v, "f_mean") or []]}
                           for a, v in (per.items() if isinstance(per, Mapping) else [])}
    return {"sizes": [number(s) for s in faith.get("sizes") or []], "domains": domains, "skipped": faith.get("skipped")}


def model_detail(row: Mapping[str, Any], measures: Sequence[str]) -> dict[str, Any]:
    """Everything the model page shows about one (model, test domain) row."""
    return model_summary(row, measures) | {
        "c2_split": number(row.get("c2_test_split_acc")), "n_train": row.get("n_train"),
        "mixture_id": row.get("mixture_id"),
        "causal": causal(row), "faithfulness": faithfulness(row), "faithfulness_auc": number(row.get("faithfulness_auc")),
        "sae": {k: number(row.get(f"sae_{k}")) for k in ("fvu", "l0", "dead")},
        "separation": {k: number(get(row, "embedding_separation", k)) for k in ("probe_accuracy", "chance", "silhouette")}}


# ------------------------------------------------------------------------------------ study
def figures(results: Mapping[str, Any]) -> dict[str, str]:
    """{figure path or glob relative to the study folder: caption} as the results list them."""
    figs = get(results, "extra", "figures")
    return {str(k): str(v) for k, v in figs.items()} if isinstance(figs, Mapping) else {}


def config(results: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar configuration entries (lists and tables left out)."""
    cfg = results.get("config")
    if not isinstance(cfg, Mapping):
        return {}
    return {str(k): v for k, v in sorted(cfg.items()) if not isinstance(v, (Mapping, list))}


def circuit_class_names(results: Mapping[str, Any]) -> list[str]:
    """The C2 classes that get circuits, in the study's order (config c2_classes[:circuit_classes])."""
    c2 = get(results, "config", "c2_classes")
    n = get(results, "config", "circuit_classes")
    if not isinstance(c2, list):
        return []
    return [str(c) for c in c2[: n if isinstance(n, int) else len(c2)]]


def class_names(results: Mapping[str, Any]) -> list[str]:
    """Every class the rows were scored on (C1 and C2), sorted: the dataset's own order for datasets
    that keep classes sorted (checked by the caller before it trusts an index into this list)."""
    names = set()
    for row in model_rows(results):
        for key in ("c1_test_acc_per_class", "c2_test_acc_per_class"):
            if isinstance(row.get(key), Mapping):
                names.update(map(str, row[key]))
    return sorted(names)
