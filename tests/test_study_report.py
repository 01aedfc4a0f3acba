"""results.json schema, Spearman bootstrap, verdict rules and the report's wording."""
import json

import numpy as np
import pytest
from scipy import stats

from clipmech.study import report as R


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


def test_spearman_ci_matches_scipy_and_handles_degenerate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + 0.5 * rng.normal(size=30)
    out = R.spearman_ci(list(x) + [None], list(y) + [0.3])
    assert out["rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out["n"] == 30 and out["n_dropped"] == 1
    assert out["ci_low"] < out["rho"] < out["ci_high"] and out["ci_low"] > 0
    assert R.spearman_ci([1, 2], [3, 4])["rho"] is None
    const = R.spearman_ci([1, 1, 1, 1], [1, 2, 3, 4])
    assert const["rho"] is None and const["reason"] == "x is constant across the 4 models"
    with pytest.raises(ValueError, match="x has 2 values but y has 3"):
        R.spearman_ci([1, 2], [1, 2, 3])


def test_verdicts_follow_the_fixed_rule():
    # Diversity helps, CG-low below DG, sharedness tracks accuracy: every finding reproduced.
    good = _models({"natural_only": [0.05, 0.06, 0.04], "lod": [0.30, 0.32, 0.31],
                    "cg_low": [0.10, 0.12, 0.11], "cg_high": [0.40, 0.42, 0.41]})
    res = R.build_results(good, config={"steps": 10})
    verdicts = {f["finding"]: f["verdict"] for f in res["findings"]}
    assert verdicts == {"domain diversity helps DG and CG": "reproduced", "CG can fall below DG": "reproduced",
                        "sharedness goes with generalization": "reproduced"}
    # Reversed: natural-only best, CG-low above everything -> contradicted, not tuned to agree.
    bad = _models({"natural_only": [0.50, 0.52, 0.51], "lod": [0.10, 0.12, 0.11],
                   "cg_low": [0.60, 0.62, 0.61], "cg_high": [0.20, 0.22, 0.21]})
    res = R.build_results(bad)
    verdicts = {f["finding"]: f["verdict"] for f in res["findings"]}
    assert verdicts["domain diversity helps DG and CG"] == "contradicted"
    assert verdicts["CG can fall below DG"] == "contradicted"
    # One seed: no CI, sign only.
    single = _models({"natural_only": [0.05], "lod": [0.3], "cg_low": [0.1], "cg_high": [0.2]})
    res = R.build_results(single)
    f1 = res["findings"][0]
    assert f1["verdict"] == "consistent (no CI)"
    assert all(e["ci_low"] is None for e in f1["evidence"])


def test_combined_verdicts():
    assert R._combine(["reproduced", "inconclusive (CI includes 0)"], "all") == "partly reproduced (1 of 2)"
    assert R._combine(["inconclusive (CI includes 0)"] * 2, "all") == "inconclusive"
    assert R._combine(["inconclusive (CI includes 0)", "reproduced"], "any") == "reproduced"
    assert R._combine(["reproduced", "contradicted"], "all") == "contradicted"
    assert R._combine(["not measured", "not measured"], "all") == "not measured"


def test_paired_difference_resamples_classes_within_one_unit():
    lod = {"setup": "lod", "seed": 0, "test_domain": "sketch", "c2_test_acc": 0.5,
           "c2_test_acc_per_class": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}}
    nat = {"setup": "natural_only", "seed": 0, "test_domain": "sketch", "c2_test_acc": 0.0,
           "c2_test_acc_per_class": {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 0.0}}
    d = R.paired_difference([lod, nat], "lod", "natural_only")
    # Classes a-d are shared; each resample's mean is k/4 for k in 0..4.
    assert d["diff"] == 0.5 and d["n"] == 1 and d["n_classes"] == 4 and d["ci_over"] == "units and classes"
    assert d["ci_low"] in (0.0, 0.25) and d["ci_high"] in (0.75, 1.0)
    # A constant per-class difference has a zero-width CI.
    same = dict(lod, c2_test_acc=0.2, c2_test_acc_per_class={k: 0.2 for k in "abcd"})
    d = R.paired_difference([same, nat], "lod", "natural_only")
    assert d["ci_low"] == pytest.approx(0.2) and d["ci_high"] == pytest.approx(0.2)
    # The setup table gets a CI for a single model from its classes.
    s = R.setup_summary([dict(lod, c1_test_acc=0.5)])
    assert s["lod"]["c2_test_acc"]["ci_low"] in (0.0, 0.25)
    assert s["lod"]["c1_test_acc"]["ci_low"] is None  # no per-class C1 accuracies given


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
        R.validate_results({"schema_version": 1, "models": []})
