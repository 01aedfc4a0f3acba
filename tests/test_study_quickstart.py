"""A reduced quickstart end to end: every stage runs on real (tiny) models and data, results.json
matches the schema, the figures exist, and a second run reuses every stage."""
import json
import time

import pytest

from clipmech.cli import main
from clipmech.study.report import MODEL_FIELDS, SHAREDNESS_MEASURES, validate_results

# Smallest settings that still exercise every stage: 15 C2 + 9 C1 classes, 4 views per drawing (fewer
# make the mixtures degenerate, which the quickstart refuses),
# one epoch, one circuit class, two IG steps.
REDUCED = ["--test-domain", "quickdraw", "--max-classes", "24", "--views", "4", "--epochs", "1", "--batch-size", "16", "--circuit-classes", "1",
           "--circuit-steps", "2", "--sae-epochs", "2", "--cka-boot", "5", "--n-templates", "1",
           "--curve-points", "2", "--quiet"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    t0 = time.perf_counter()
    assert main(["quickstart", "--out", str(out), *REDUCED]) == 0
    return out, time.perf_counter() - t0


def test_results_match_schema_and_figures_exist(quickstart):
    out, _ = quickstart
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert {m["setup"] for m in results["models"]} == {"natural_only", "lod", "cg_low", "cg_high"}
    assert all(set(MODEL_FIELDS) <= set(m) for m in results["models"])
    assert all(m["test_domain"] == "quickdraw" for m in results["models"])
    assert set(results["correlations"]) == set(SHAREDNESS_MEASURES)
    for name in ("fig2_c2_accuracy", "accuracy_over_epochs", "cka_per_layer", "circuit_jaccard",
                 "umap_by_domain", "feature_sharing", "sharedness_vs_c2"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "CG can fall below DG" in report and "| cg_high |" in report


def test_second_run_reuses_everything(quickstart, capsys):
    out, first = quickstart
    before = (out / "results.json").read_text()
    t0 = time.perf_counter()
    assert main(["quickstart", "--out", str(out), *REDUCED[:-1]]) == 0
    second = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "done (reused)" in err and "train natural_only-s0: done (reused)" in err
    assert second < max(0.5 * first, 20)
    after = json.loads((out / "results.json").read_text())
    assert [m["c2_test_acc"] for m in after["models"]] == [m["c2_test_acc"] for m in json.loads(before)["models"]]


def test_bad_options_name_the_fix(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--test-domain", "quickdrew", *REDUCED]) == 1
    assert "quickdraw" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(tmp_path), "--test-domain", "real", *REDUCED]) == 1
    assert "natural domain 'real' cannot be a test domain" in capsys.readouterr().err


def test_hidden_flags_match_options_and_plan():
    from clipmech.study.cli import _TUNABLE
    from clipmech.study.quickstart import QuickstartOptions, curve_epochs, model_specs
    defaults = QuickstartOptions()
    for name, ftype in _TUNABLE.items():
        value = getattr(defaults, name)
        assert value is None or isinstance(value, ftype), name
    assert curve_epochs(5, 3) == [0, 2, 5]  # round half to even: 2.5 -> 2
    assert curve_epochs(1, 2) == [0, 1]
    specs = model_specs(QuickstartOptions(seeds=2), ["quickdraw", "sketch"])
    # natural-only is one model per seed, shared by every test domain
    assert len(specs) == 16 and len({s.run_id for s in specs}) == 14


def test_identical_mixtures_are_refused():
    from clipmech.study.quickstart import ModelSpec, check_distinct_mixtures
    specs = [ModelSpec("lod", 0, "quickdraw"), ModelSpec("cg_high", 0, "quickdraw")]
    runs = {s.run_id: {"mixture_hash": "same"} for s in specs}
    with pytest.raises(RuntimeError, match="lod and cg_high mixtures .* hold the same training samples"):
        check_distinct_mixtures(specs, runs)
    runs[specs[1].run_id]["mixture_hash"] = "other"
    check_distinct_mixtures(specs, runs)


def test_rows_carry_the_controls(quickstart):
    """Issue 13: floors, ceilings and normalised scores (or the reason they are undefined), faithfulness
    area, SAE metrics and the causal test in every model row, and the controls figures."""
    from clipmech.study.controls import CONTROL_SCORES
    out, _ = quickstart
    results = json.loads((out / "results.json").read_text())
    for m in results["models"]:
        reasons = m["controls"]["norm_reasons"]
        for s in CONTROL_SCORES:
            assert {f"{s}_floor", f"{s}_ceiling", f"{s}_norm"} <= set(m)
            assert (m[f"{s}_norm"] is None) == (reasons[s] is not None)
        assert {"wl", "faithfulness_auc", "sae_l0", "sae_fvu", "sae_dead", "causal_effect_logit",
                "causal_verdict", "causal_trimmed_fraction"} <= set(m)
        assert 0 <= m["sae_dead"] <= 1 and m["sae_fvu"] >= 0
        assert set(m["controls"]["cpu_s"]) == {"circuits", "sae", "cka", "causal", "faithfulness"}
    assert (out / "figures" / "sharedness_controls.png").stat().st_size > 5000
    assert any(p.name.startswith("faithfulness_") for p in (out / "figures").iterdir())
