"""A reduced quickstart end to end: every stage runs on real (tiny) models and data, results.json
matches the schema, the figures exist, and a second run reuses every stage."""
import json
import shutil
import time

import pytest
import torch

from clipmech.cli import main
from clipmech.study.report import MODEL_FIELDS, SHAREDNESS_MEASURES, validate_results

# Smallest settings that still exercise every stage: 15 C2 + 9 C1 classes, 4 views per drawing (fewer
# make the mixtures degenerate, which the quickstart refuses),
# one epoch, one circuit class, two IG steps.
REDUCED = ["--test-domain", "quickdraw", "--max-classes", "24", "--n-c2", "15", "--seeds", "1", "--views", "4", "--epochs", "1", "--batch-size", "16", "--circuit-classes", "1",
           "--circuit-steps", "2", "--sae-steps", "20", "--cka-boot", "5", "--n-templates", "1",
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
    # C2 is scored on both unseen drawings of each (test domain, class); rows name their model
    nat = next(m for m in results["models"] if m["setup"] == "natural_only")
    assert nat["model_id"] == "natural_only-s0" and set(nat["c2_test_acc_per_class"].values()) <= {0.0, 0.5, 1.0}
    assert results["config"]["c2_drawings_per_cell"] == "2" and results["extra"]["stages"]


def test_report_recomputes_the_same_verdicts_for_any_boot_seed(quickstart, tmp_path, capsys):
    out, _ = quickstart
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("runs", "cache", "registry"))
    original = json.loads((run / "results.json").read_text())
    verdicts = set()
    for seed in range(5):
        assert main(["report", str(run), "--boot-seed", str(seed)]) == 0
        res = json.loads((run / "results.json").read_text())
        assert res["models"] == original["models"] and res["statistics"]["boot_seed"] == seed
        verdicts.add(tuple(f["verdict"] for f in res["findings"]))
    assert len(verdicts) == 1
    md = (run / "report.md").read_text()
    assert "figures/fig2_c2_accuracy.png" in md and "What the CIs cover" in md
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "must be a folder written by `clipmech quickstart`" in capsys.readouterr().err


def test_unseen_c2_drawings_are_never_trained_on():
    from clipmech.data.mixtures import build_mixture
    from clipmech.study.quickstart import (ModelSpec, QuickstartOptions, Study, drawings_per_cell,
                                           resolve_dataset, unseen_c2_rows)
    study = Study(QuickstartOptions(max_classes=24, n_c2=15, test_domains=("quickdraw",)))
    study.dataset, study.test_domains, study.c2 = resolve_dataset(study.opts)
    ds = study.dataset
    train_idx = ds.indices(split="train")
    for setup in ("natural_only", "lod", "cg_low", "cg_high"):
        spec = ModelSpec(setup, 0, "quickdraw")
        rows = unseen_c2_rows(study, spec)
        mix = build_mixture(ds, setup, test_domain=None if setup == "natural_only" else "quickdraw",
                            test_classes=study.c2, split="train", seed=42)
        assert not set(train_idx[rows].tolist()) & set(mix.indices.tolist()), setup
        assert (ds.view_idx[train_idx[rows]] == 0).all()  # original drawings, no augmented views
        in_test_domain = ds.domain_idx[train_idx[rows]] == ds.domain_index("quickdraw")
        assert in_test_domain.sum() == 15, setup  # one train-split drawing per C2 class of quickdraw
        if setup != "natural_only":
            assert in_test_domain.all()
        else:  # natural-only never trained on any non-natural domain
            assert {ds.domains[i] for i in ds.domain_idx[train_idx[rows]]} == set(ds.domains) - {"real"}
    assert drawings_per_cell(study) == "2"


def test_c2_extension_follows_the_builders_rule():
    from clipmech.study.quickstart import extend_c2
    classes = [f"c{i}" for i in range(30)]
    ext = extend_c2(["c3", "c7"], classes, 6)
    assert ext[:2] == ["c3", "c7"] and len(ext) == 6 and len(set(ext)) == 6
    import hashlib
    assert ext[2:] == sorted((c for c in classes if c not in ("c3", "c7")),
                             key=lambda c: hashlib.sha256(c.encode()).hexdigest())[:4]
    assert extend_c2(["c3", "c7"], classes, 1) == ["c3", "c7"]
    with pytest.raises(ValueError, match="leaves fewer than 4 C1 classes"):
        extend_c2([], classes, 27)


def test_second_run_reuses_everything(quickstart, capsys):
    out, first = quickstart
    before = (out / "results.json").read_text()
    t0 = time.perf_counter()
    assert main(["quickstart", "--out", str(out), *REDUCED[:-1]]) == 0
    second = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "done (reused)" in err and "] train: done (reused)" in err
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
        assert set(m["controls"]["cpu_s"]) == {"circuits", "sae", "cka", "causal", "causal_test", "faithfulness"}
        # one circuit class: no placebo class exists, the placebo test says so and the matched test decides
        assert "placebo needs 2" in m["controls"]["causal_test"]["reason"]
    assert (out / "figures" / "sharedness_controls.png").stat().st_size > 5000
    # one faithfulness figure for all models (not one per model and domain)
    assert (out / "figures" / "faithfulness.png").stat().st_size > 5000
    assert not any(p.name.startswith("faithfulness_") for p in (out / "figures").iterdir())


def test_circuits_and_saes_are_computed_once_per_weights(quickstart):
    """One seed, four setups on one test domain: each trained model has one test-drawing and one
    training-drawing circuit set and two SAEs (seeds 0, 1); the four untrained checkpoints hold the
    same weights (one seed) and share one circuit set. The controls' score circuits are the circuit
    stage's own, and the SAE stage's SAE is the controls' seed 0."""
    from clipmech.utils import state_dict_hash
    out, _ = quickstart
    results = json.loads((out / "results.json").read_text())
    models = {m["run_id"] for m in results["models"]}
    assert len(models) == 4
    untrained = {state_dict_hash(torch.load(p, weights_only=False)["state_dict"]) for p in out.glob("runs/*/epoch_0.pt")}
    assert len(untrained) == 1
    sets = [json.loads(p.read_text())["key"] for p in (out / "registry" / "circuit_set").glob("*.json")]
    assert sorted(k["split"] for k in sets).count("train") == len(models)
    assert len(sets) == 2 * len(models) + len(untrained)
    assert len(list((out / "registry" / "sae_model").glob("*.json"))) == 2 * len(models)
    assert len(list((out / "registry" / "sae_files").glob("*.pt"))) == 2 * len(models)


def test_dataset_folder_gets_the_same_rules_scaled_to_its_classes(tmp_path):
    """`clipmech quickstart --dataset ROOT`: test domains clipart and painting, C2 = the paper's classes
    the folder holds then the smallest sha256(name), n_c2 capped so 4 C1 classes stay; too few classes
    is one clear error."""
    from dataclasses import replace

    from clipmech.data.domainnet import DOMAINS
    from clipmech.data.synthetic import write_fake_domainnet
    from clipmech.study.quickstart import MIN_CLASSES, QuickstartOptions, extend_c2, resolve_dataset
    classes = ["axe", "banana", "cat", "dog", "eye", "fish", "hat", "key", "owl", "tree"]
    root = write_fake_domainnet(tmp_path / "dn", {(d, c, s): 1 for d in DOMAINS for c in classes
                                                  for s in ("train", "test")}, size=4)
    ds, domains, c2 = resolve_dataset(QuickstartOptions(dataset=str(root)))
    assert domains == ["clipart", "painting"]
    assert len(c2) == len(classes) - 4 and c2[:2] == ["axe", "banana"]  # the paper's C2 first
    assert c2 == extend_c2(["axe", "banana"], ds.classes, len(classes) - 4) and len(ds.classes) == len(classes)
    _, _, c2 = resolve_dataset(QuickstartOptions(dataset=str(root), n_c2=3))
    assert c2 == ["axe", "banana", extend_c2([], [c for c in classes if c not in ("axe", "banana")], 1)[0]]
    small = write_fake_domainnet(tmp_path / "small", {(d, c, s): 1 for d in DOMAINS for c in classes[:MIN_CLASSES - 1]
                                                      for s in ("train", "test")}, size=4)
    with pytest.raises(ValueError, match=f"has {MIN_CLASSES - 1} classes; the quickstart needs at least {MIN_CLASSES}"):
        resolve_dataset(replace(QuickstartOptions(), dataset=str(small)))


def test_node_explanations_name_their_model_so_the_viewer_shows_them(quickstart, tmp_path):
    """The report's node figures come from one CG-high model; its explanations.json names that row's model,
    so `clipmech view` puts the nodes on the model's page (it found none before the id was written)."""

    from clipmech.view.site import build_site
    out, _ = quickstart
    meta = json.loads((out / "figures" / "explain" / "explanations.json").read_text())["meta"]
    models = json.loads((out / "results.json").read_text())["models"]
    row = next(m for m in models if m["model_id"] == meta["model_id"])
    assert row["setup"] == "cg_high" and row["test_domain"] == meta["test_domain"]
    study = tmp_path / "study"
    shutil.copytree(out, study, ignore=shutil.ignore_patterns("cache", "runs", "view"))
    assert build_site(study).explained_models == 1


def test_quickstart_with_eap_ig_circuits(quickstart, tmp_path, capsys):
    """The reduced quickstart's models (training reused) analysed with EAP-IG circuits: new circuit
    sets whose files say eap_ig, rows with node / edge Jaccard, a report that labels them exploratory."""
    out = tmp_path / "qs"
    shutil.copytree(quickstart[0], out)
    paper = {p.name for p in (out / "registry" / "circuit_set").glob("*.json")}
    assert main(["quickstart", "--out", str(out), "--circuit-method", "eap_ig", *REDUCED[:-1]]) == 0
    assert "] train: done (reused)" in capsys.readouterr().err
    sets = {p.name: json.loads(p.read_text())["key"] for p in (out / "registry" / "circuit_set").glob("*.json")}
    new = [k for name, k in sets.items() if name not in paper]
    assert new and all(k["circuit_method"] == "eap_ig" for k in new)
    files = [json.loads(p.read_text()) for p in (out / "registry" / "circuit_files").rglob("*.json")]
    assert {f["meta"].get("method", "paper_ig") for f in files if "meta" in f} == {"paper_ig", "eap_ig"}
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["circuit_method"] == "eap_ig"
    assert any(m.get("node_jaccard") is not None for m in results["models"])
    assert "not the analysis plan's method" in (out / "report.md").read_text()
