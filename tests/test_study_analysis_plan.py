"""The analysis plan (issue 26): the shipped file, its hash, confirmatory vs exploratory status,
refusal of a broken plan, and `clipmech report --plan FILE` re-judging a run as exploratory."""
from __future__ import annotations

import hashlib
import json
from importlib.resources import files

import pytest

from clipmech.study import report as R
from clipmech.study.analysis_plan import load_plan

SHIPPED = files("clipmech.study") / "plans" / "plan-v1.toml"


def _rows(seeds):
    rows = []
    for s in seeds:
        for setup, acc in {"natural_only": 0.2, "lod": 0.5, "cg_low": 0.3, "cg_high": 0.4}.items():
            a = acc + 0.01 * s
            rows.append({"setup": setup, "seed": s, "test_domain": "sketch", "c1_test_acc": 0.5, "c2_test_acc": a,
                         "cka_mid": a, "node_jaccard": a, "edge_jaccard": a / 2, "feature_sharing": a})
    return rows


def test_shipped_plan_names_every_finding_and_its_hash_is_the_files():
    plan = load_plan()
    assert plan.shipped and plan.sha256 == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()[:16]
    assert [f["id"] for f in plan.data["findings"]] == ["diversity", "cg_below_dg", "sharedness", "causal"]
    assert plan.finding("cg_below_dg")["contrasts"] == [["lod", "cg_high"]]  # finding 2: the diagnostic contrast
    assert plan.finding("causal")["min_classes"] >= 8 and plan.data["alpha"] == 0.05
    with pytest.raises(KeyError, match="no finding 'x'"):
        plan.finding("x")


def test_status_is_confirmatory_only_on_the_plans_seeds_under_the_shipped_plan(tmp_path):
    plan = load_plan()
    seeds = plan.data["confirmatory_seeds"]
    assert plan.status(seeds) == "confirmatory"
    assert plan.status(seeds[:1]) == "confirmatory"
    assert plan.status(seeds + [0]).startswith("exploratory (seeds [0]")  # a seen seed among them
    assert plan.status([]).startswith("exploratory")
    (tmp_path / "copy.toml").write_bytes(SHIPPED.read_bytes())
    copy = load_plan(tmp_path / "copy.toml")  # same rules, but not the plan fixed in advance
    assert copy.sha256 == plan.sha256 and copy.status(seeds).startswith("exploratory (judged under")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("alpha = 0.05", "alpha = 1.5"), "alpha 1.5 is not in"),
    (lambda t: t.replace("version = 1\n", ""), "'version' missing"),
    (lambda t: t.replace('rule = "one"', 'rule = "some"'), "rule 'some' is not one of"),
    (lambda t: t + "\n[[oops", "not valid TOML"),
])
def test_a_broken_plan_is_refused_naming_the_problem(tmp_path, edit, message):
    (tmp_path / "bad.toml").write_text(edit(SHIPPED.read_text()))
    with pytest.raises(ValueError, match=message):
        load_plan(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(tmp_path / "missing.toml")


def test_results_record_the_plan_and_report_plan_rejudges_as_exploratory(tmp_path, capsys):
    from clipmech.cli import main
    plan = load_plan()
    res = R.build_results(_rows(plan.data["confirmatory_seeds"]), n_boot=200)
    assert res["plan"] == {"version": 1, "sha256": plan.sha256, "source": "clipmech:plans/plan-v1.toml",
                           "status": "confirmatory"}
    R.write_outputs(res, tmp_path)
    assert f"sha256 {plan.sha256}): verdicts are **confirmatory**" in (tmp_path / "report.md").read_text()
    other = tmp_path / "other.toml"
    other.write_text(SHIPPED.read_text().replace("alpha = 0.05", "alpha = 0.1"))
    assert main(["report", str(tmp_path), "--plan", str(other), "--n-boot", "200"]) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["plan"]["status"].startswith("exploratory") and out["statistics"]["alpha"] == 0.1
    assert "exploratory" in capsys.readouterr().out



def _causal_test(primary: float, n_classes: int = 8) -> dict:
    eff = {o: {"effect": 0.2, "randomisation": {"p": 0.02}} for o in ("accuracy", "logit", "margin")}
    return {"classes": {f"k{i}": {"primary": {a: {o: primary for o in eff} for a in ("mean", "resample")},
                                  "balanced": True, "shared": {a: eff for a in ("mean", "resample")},
                                  "strata": [{"stratum": z, "size": 2, "unmatched": 0, "mean": eff, "resample": eff}
                                             for z in range(4)]} for i in range(n_classes)}}


def test_rows_with_the_placebo_test_are_judged_by_it_and_rendered():
    rows = _rows([3, 4, 5])
    for r in rows:
        r["controls"] = {"causal_test": _causal_test(0.1)}
    res = R.build_results(rows, n_boot=200)
    causal = res["findings"][-1]
    assert causal["id"] == "causal" and causal["verdict"] == "reproduced"  # 8 classes all positive: p = 1/256
    assert causal["evidence"][0]["p"] == 1 / 256 and causal["matched_test"]["verdict"] == "not measured"
    assert len(causal["beside"]) == 5  # (mean, resample) x (logit, margin, accuracy) but the primary
    text = R.render_report(res)
    assert "sign-flip p = 0.0039 (side greater" in text and "stratum 3: +0.200 (0 of 192 unmatched)" in text
    for r in rows:
        r["controls"] = {"causal_test": _causal_test(0.0)}  # placebo effect equal to the shared effect
    assert R.build_results(rows, n_boot=200)["findings"][-1]["verdict"] == "inconclusive"


def test_each_measure_reports_its_reliability_where_it_is_judged():
    import numpy as np
    rng = np.random.default_rng(0)
    rows = _rows([3, 4, 5])
    for r in rows:  # per-class node Jaccard: row mean = the row's score, class noise SD 0.3 over 40 classes
        per = r["node_jaccard"] + rng.normal(0, 0.3, 40)
        r["node_jaccard"] = float(per.mean())
        r["controls"] = {"nulls": {"node_jaccard": {"score": {"per_class": per.tolist()}}}}
    res = R.build_results(rows, n_boot=200)
    rel = res["correlations"]["node_jaccard"]["reliability"]
    se2 = 0.3 ** 2 / 40  # expected class-bootstrap SE^2
    var = np.var([r["node_jaccard"] for r in rows], ddof=1)
    assert rel["reliability"] == pytest.approx(1 - se2 / var, abs=0.05) and rel["n"] == 12
    assert res["correlations"]["cka_mid"]["reliability"]["reliability"] is None  # no per-class values
    assert "reliability" in R.render_report(res) and "need 3" in R.render_report(res)
