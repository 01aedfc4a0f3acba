"""results.json schema, Spearman bootstrap, verdict rules and the report's wording."""
import json
from importlib.resources import files

import numpy as np
import pytest

from clipmech.analysis import bootstrap as B
from clipmech.study import report as R
from clipmech.study.analysis_plan import load_plan


def _models(c2: dict[str, list[float]], domain="sketch"):
    rng = np.random.default_rng(1)
    rows = []
    for setup, per_seed in c2.items():
        for seed, acc in enumerate(per_seed):
            share = acc + 0.01 * rng.normal()  # sharedness tracks accuracy
            rows.append({"setup": setup, "seed": seed, "test_domain": domain, "c1_test_acc": 0.5,
                         "c2_test_acc": acc, "cka_mid": share, "node_jaccard": share,
                         "edge_jaccard": share / 2, "feature_sharing": share})
    return rows


def test_middle_third_and_cka_mid():
    assert R.middle_third(21) == slice(7, 14)
    assert R.middle_third(10) == slice(3, 7)
    assert R.middle_third(2) == slice(0, 2)
    per_layer = {("real", "sketch"): [0, 0, 0, 1, 1, 1, 0, 0, 0], ("clipart", "sketch"): [0, 0, 0, 0.5, 0.5, 0.5, 0, 0, 0],
                 ("clipart", "real"): [9] * 9}
    assert R.cka_mid(per_layer, "sketch") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no CKA pair contains the test domain 'quickdraw'"):
        R.cka_mid(per_layer, "quickdraw")


def _per_class_models(p: dict[str, float], n_cls=30, seeds=3, domains=("clipart", "painting"), seed=0):
    """Rows with per-class C2 accuracies (one drawing per class: 0 or 1) drawn with success rate
    p[setup]; sharedness tracks accuracy. Natural-only rows of a seed share one model_id."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in domains:
        for s in range(seeds):
            for setup, rate in p.items():
                pc = {f"k{i}": float(rng.random() < rate) for i in range(n_cls)}
                acc = float(np.mean(list(pc.values())))
                share = acc + 0.05 * rng.normal()
                rows.append({"setup": setup, "seed": s, "test_domain": d, "c1_test_acc": 0.5, "c2_test_acc": acc,
                             "c2_test_acc_per_class": pc, "cka_mid": share, "node_jaccard": share,
                             "edge_jaccard": share / 2, "feature_sharing": share})
    return rows


def test_verdicts_are_the_same_for_five_bootstrap_seeds():
    rows = _per_class_models({"natural_only": 0.1, "lod": 0.4, "cg_low": 0.15, "cg_high": 0.45})
    verdicts = set()
    for seed in range(5):
        res = R.build_results(rows, boot_seed=seed)
        verdicts.add(tuple((f["verdict"], tuple(e["verdict"] for e in f["evidence"])) for f in res["findings"]))
    assert len(verdicts) == 1
    f1, f2, f3, causal = verdicts.pop()
    assert causal[0] == "not measured" and f1[0] == f3[0] == "reproduced"
    assert f2 == ("inconclusive", ("inconclusive",))  # decided by LOD - CG-high: no difference in the data
    beside = R.build_results(rows)["findings"][1]["beside"]  # LOD - CG-low, also differing in diversity
    assert len(beside) == 1 and beside[0]["worse"] == "cg_low" and "diversity" in beside[0]["label"]
    assert beside[0]["verdict"] == "reproduced"


def test_holm_is_applied_per_claim_and_reported_raw_and_adjusted():
    res = R.build_results(_per_class_models({"natural_only": 0.1, "lod": 0.4, "cg_low": 0.15, "cg_high": 0.45}))
    f1, f2, f3, _ = res["findings"]
    for e in f1["evidence"]:  # each must hold: no correction to reproduce
        assert e["p_adjusted"] == e["p_star"] and e["rule"] == R.RULES["all"]
    q = [1 - e["p_star"] for e in f1["evidence"]]  # one contradicted piece contradicts: Holm on that side
    assert [e["p_opposite_adjusted"] for e in f1["evidence"]] == pytest.approx(B.holm(q)[0])
    assert len(f2["evidence"]) == 1 and f2["evidence"][0]["p_adjusted"] == f2["evidence"][0]["p_star"]
    assert [e["p_adjusted"] for e in f3["evidence"]] == pytest.approx(B.holm([e["p_star"] for e in f3["evidence"]])[0])
    assert res["plan"]["sha256"] == load_plan().sha256 and res["plan"]["status"].startswith("exploratory")
    for e in f1["evidence"] + f2["evidence"]:
        assert {"estimate", "ci_low", "ci_high", "level", "p_star", "p_star_se", "n_models", "n_classes",
                "rule", "p_adjusted", "verdict", "verdict_unadjusted"} <= set(e)
        assert e["n_classes"] == 30 and e["n_seeds"] == 3


def test_reversed_effects_are_contradicted_and_one_seed_without_classes_has_no_ci():
    bad = _models({"natural_only": [0.50, 0.52, 0.51], "lod": [0.10, 0.12, 0.11],
                   "cg_low": [0.60, 0.62, 0.61], "cg_high": [0.20, 0.22, 0.21]})
    verdicts = {f["finding"]: f["verdict"] for f in R.build_results(bad)["findings"]}
    assert verdicts["domain diversity helps DG and CG"] == "contradicted"
    assert verdicts["CG can fall below DG"] == "contradicted"
    single = _models({"natural_only": [0.05], "lod": [0.3], "cg_low": [0.1], "cg_high": [0.2]})
    f1 = R.build_results(single)["findings"][0]
    assert f1["verdict"] == "consistent (no CI)" and all(e["ci_low"] is None for e in f1["evidence"])


def test_combined_verdicts():
    inc, rep, con, bor = B.INCONCLUSIVE, B.REPRODUCED, B.CONTRADICTED, B.BORDERLINE
    assert R._combine([rep, inc], "all") == "partly reproduced (1 of 2)"
    assert R._combine([inc, inc], "all") == "inconclusive"
    assert R._combine([inc, rep], "any") == "reproduced"
    assert R._combine([rep, con], "all") == "contradicted"
    assert R._combine([con, inc], "any") == "inconclusive"
    assert R._combine([bor, inc], "any") == bor
    assert R._combine(["not measured", "not measured"], "all") == "not measured"


def test_finding3_judges_by_normalized_measure_when_every_row_has_one(tmp_path):
    rows = _per_class_models({"natural_only": 0.1, "lod": 0.4, "cg_low": 0.15, "cg_high": 0.45})
    for r in rows:
        r["cka_mid_norm"] = -r["cka_mid"]  # normalized sharedness that runs against accuracy
    raw = R.build_results(rows)  # the shipped plan judges the raw measure, normalized beside
    assert next(e for e in raw["findings"][2]["evidence"] if e["measure"] == "cka_mid")["judged_by"] == "cka_mid"
    text = (files("clipmech.study") / "plans" / "plan-v1.toml").read_text().replace('variant = "raw"',
                                                                                   'variant = "normalized"')
    (tmp_path / "norm.toml").write_text(text)
    plan = load_plan(tmp_path / "norm.toml")
    res = R.build_results(rows, plan=plan)
    assert res["plan"]["status"].startswith("exploratory (judged under")
    cka = next(e for e in res["findings"][2]["evidence"] if e["measure"] == "cka_mid")
    assert cka["judged_by"] == "cka_mid_norm" and cka["rho"] < 0 < cka["raw"]["rho"]
    assert res["correlations"]["cka_mid"]["normalized"]["rho"] == pytest.approx(cka["rho"])
    assert "judged by cka_mid_norm" in R.render_report(res)
    # the setup-centred rho is computed on the judged (normalized) variant
    assert res["correlations"]["cka_mid"]["centred"]["measure"] == "cka_mid_norm"
    rows[0]["cka_mid_norm"] = None  # undefined for one row: judge by raw, say so
    res = R.build_results(rows, plan=plan)
    assert next(e for e in res["findings"][2]["evidence"] if e["measure"] == "cka_mid")["judged_by"] == "cka_mid"


def test_setup_summary_and_power_report():
    rows = _per_class_models({"natural_only": 0.1, "lod": 0.4, "cg_low": 0.15, "cg_high": 0.45})
    s = R.setup_summary(rows)
    assert s["natural_only"]["n"] == 3 and s["lod"]["n"] == 6  # natural-only: one model per seed
    lod = [r["c2_test_acc"] for r in rows if r["setup"] == "lod"]
    assert s["lod"]["c2_test_acc"]["mean"] == pytest.approx(np.mean(lod))
    assert s["lod"]["c2_test_acc"]["ci_low"] < np.mean(lod) < s["lod"]["c2_test_acc"]["ci_high"]
    pw = R.build_results(rows)["power"]
    assert set(pw["half_width"]) == {"lod - natural_only", "cg_high - cg_low", "lod - cg_low", "lod - cg_high"}
    assert pw["pilot"]["n_classes"] == [5, 10, 15, 20, 30]
    # more classes, narrower CI (up to Monte-Carlo noise)
    curve = pw["pilot"]["lod - natural_only"]
    assert curve[0] > curve[-1] and curve[-1] == pytest.approx(pw["half_width"]["lod - natural_only"])
    assert pw["met"] == all(h <= 0.15 for h in pw["half_width"].values())


def test_scale_caveat_follows_the_dataset():
    rows = _per_class_models({"natural_only": 0.1, "lod": 0.4, "cg_low": 0.15, "cg_high": 0.45})
    emoji = R.render_report(R.build_results(rows, config={"dataset": "emoji"}))
    domainnet = R.render_report(R.build_results(rows, config={"experiment": "main"}))
    assert "Tiny models on the embedded emoji domains" in emoji
    assert "emoji" not in domainnet and "only where model, data, training budget and seeds match" in domainnet


def test_validate_results_names_the_problem(tmp_path):
    res = R.build_results(_models({"lod": [0.3, 0.2], "cg_low": [0.1, 0.15]}))
    R.write_outputs(res, tmp_path)
    loaded = json.loads((tmp_path / "results.json").read_text())
    R.validate_results(loaded)
    md = (tmp_path / "report.md").read_text()
    assert "CG can fall below DG" in md and "Spearman" in md and "| lod |" in md
    loaded["models"][0]["c2_test_acc"] = 1.5
    del loaded["models"][1]["edge_jaccard"]
    with pytest.raises(ValueError, match=r"models\[0\].c2_test_acc = 1.5.*models\[1\] lacks \['edge_jaccard'\]"):
        R.validate_results(loaded)
    with pytest.raises(ValueError, match="missing top-level key 'correlations'"):
        R.validate_results({"schema_version": R.SCHEMA_VERSION, "models": []})
    assert "What the CIs cover" in md and "## Power" in md


def _causal_rows(mean: float, sd: float, seed: int = 0):
    """Natural-only (one model on two test domains) and LOD rows, 3 seeds, with per-class causal
    effects N(mean, sd) on the logit and the sign of it on accuracy; no controls when sd is None."""
    rng = np.random.default_rng(seed)
    rows = _per_class_models({"natural_only": 0.1, "lod": 0.4}, n_cls=6)
    for r in rows:
        eff = {k: mean + (sd * rng.normal() if sd else 0.0) for k in r["c2_test_acc_per_class"]}
        r["controls"] = {"causal": {"trimmed_fraction": 0.5, "per_class": {
            k: {"effect_logit": v, "effect_accuracy": float(np.sign(v))} for k, v in eff.items()}}}
    return rows


def test_causal_finding_verdicts_zero_boundary_and_old_rows():
    rows = _causal_rows(0.05, 0.1)
    verdicts = set()
    for seed in range(3):
        f = R.assess_causal(rows, seed=seed)
        per_setup = tuple(e["logit"]["verdict"] for e in f["per_setup"].values())
        verdicts.add((f["verdict"], f["accuracy"]["verdict"], per_setup))
    assert len(verdicts) == 1 and verdicts.pop()[0] == B.REPRODUCED
    f = R.assess_causal(rows)
    ev = f["evidence"][0]
    assert ev["n_models"] == 9 and ev["n_rows"] == 12  # natural-only: one model per seed on two domains
    assert f["per_setup"]["natural_only"]["logit"]["n_models"] == 3 and f["trimmed_fraction"]["mean"] == 0.5
    assert (R.assess_causal(_causal_rows(-0.05, 0.1))["verdict"]) == B.CONTRADICTED
    zero = R.assess_causal(_causal_rows(0.0, None))  # every effect exactly 0: p* = 1/2, not a positive verdict
    assert zero["evidence"][0]["estimate"] == 0 and zero["evidence"][0]["p_star"] == 0.5
    assert zero["verdict"] == B.INCONCLUSIVE
    old = R.build_results(_per_class_models({"natural_only": 0.1, "lod": 0.4, "cg_low": 0.15, "cg_high": 0.45}))
    causal = old["findings"][-1]
    assert causal["finding"] == R.CAUSAL_FINDING and causal["verdict"] == "not measured"
    assert "not measured" in R.render_report(old).split(R.CAUSAL_FINDING)[1]
    text = R.render_report(R.build_results(rows))
    assert "logit effect (shared − matched-control drop) = +0.0" in text and "| natural_only | 3 |" in text
    assert "9 trained models as clusters" in text


def test_report_states_the_randomisation_null_beside_the_balance_check():
    b = {"ablation": "mean", "outcome": "logit", "limit": 0.1, "n_pairs": 4, "n_balanced": 1, "infinite": 0,
         "shared_smd_quartiles": [0.1, 0.2, 0.3], "shared_positive": 1.0, "shared_within_limit": 0.25,
         "placebo_abs_smd_median": 0.4, "strata_all_pairs": {0: {"effect": 0.01, "n": 4}},
         "randomisation_all_pairs": {"n": 4, "median_p": 0.0274, "share_p_le_0.05": 0.75, "n_null": [200]}}
    text = "\n".join(R._balance_lines(b))
    assert "ranked among its 200 matched random sets" in text and "median 0.027; p ≤ 0.05 in 75 % of 4 pairs" in text
    old = {k: v for k, v in b.items() if k != "randomisation_all_pairs"}  # results written before the null line
    assert "Randomisation null" not in "\n".join(R._balance_lines(old)) and "Balance check" in "\n".join(R._balance_lines(old))
