"""The paper-scale study end to end on a DomainNet-layout fixture of 20 classes of which only 4 are among
the paper's C2 classes: `clipmech experiment run` trains two 64 px runs, `clipmech experiment analyse`
analyses them from their own configs (C2 = the dataset's default, the 4 paper classes present) and
writes results.json, report.md and figures; every measure that can be computed is, with the controls,
and CKA's C2 measures are null with their reason (4 centroid rows < 8); the same through
`--launcher slurm` on submitit's local executor."""
import json

import pytest

from clipmech.cli import main
from clipmech.data.domainnet import DOMAINS
from clipmech.data.synthetic import write_fake_domainnet

C2 = ["axe", "banana", "barn", "bed"]  # the paper's C2 classes among the fixture's, in the paper's order
CLASSES = tuple(sorted(C2 + ["apple", "bear", "cat", "dog", "eye", "fish", "tree", "cup", "door", "fork",
                             "hat", "key", "leaf", "moon", "nail", "owl"]))

TRAIN = f"""
[experiment]
name = "tiny"
kind = "clip"
[base.model]
name = "tiny-rn"
image_size = 64
[base.data]
dataset = "{{domainnet}}"
[base.schedule]
warmup = 1
[base.train]
epochs = 1
batch_size = 32
tensorboard = false
progress = false
[base.eval]
templates = "simple"
[matrix]
"mixture.setup" = ["lod", "cg_high"]
"mixture.test_domain" = ["clipart"]
[launch]
nproc_per_node = 1
gpus_per_job = 0
"""

ANALYSIS = """
[experiment]
name = "tinymech"
kind = "analysis"
[analysis]
source = "tiny.toml"
circuit_steps = 2
sae_steps = 600  # the controls need a sparse SAE (L0 < width) for feature sharing's floor and ceiling
sae_batch_size = 256
sae_lr = 3e-3
cka_boot = 10
embedding_images = 20
device = "cpu"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paperscale")
    counts = {(d, c, s): (3 if s == "train" else 2) for d in DOMAINS for c in CLASSES for s in ("train", "test")}
    data = write_fake_domainnet(root / "dn", counts, size=16)
    (root / "tiny.toml").write_text(TRAIN)
    (root / "mech.toml").write_text(ANALYSIS)
    return root, data


def _study(root, data, out, *launcher):
    common = ["--data", f"domainnet={data}", "--out", str(out), *launcher]
    assert main(["experiment", "run", str(root / "tiny.toml"), *common]) == 0
    assert main(["experiment", "analyse", str(root / "mech.toml"), *common]) == 0
    return json.loads((out / "tinymech" / "results.json").read_text())


def _check(results, out):
    models = results["models"]
    assert {m["setup"] for m in models} == {"lod", "cg_high"} and len(models) == 2
    for m in models:
        assert m["image_size"] == 64  # the run's own size, not the quickstart's 32
        assert m["classes"] == sorted(CLASSES)  # every fixture class, not a quickstart subset
        assert m["c2_classes"] == C2 and m["test_domain"] == "clipart"
        assert set(m["c2_test_acc_per_class"]) == set(C2)
        for k in ("node_jaccard", "edge_jaccard", "feature_sharing", "wl"):
            assert -1 <= m[k] <= 1
            assert m[f"{k}_floor"] is not None and m[f"{k}_ceiling"] is not None and f"{k}_norm" in m, k
        assert m["cka_mid"] is None and m["null_reasons"]["cka_mid"].startswith("C2 rows 4 < 8")
        assert m["cka_mid_norm"] is None and "C2 rows 4 < 8" in m["controls"]["norm_reasons"]["cka_mid"]
        # faithfulness is measured; a 1-epoch model's logit barely moves under ablation, so its curve may be
        # undefined (|m(model) - m(empty)| < eps), which the row counts instead of reporting a number
        faith = m["controls"]["faithfulness"]
        assert faith["domains"]["clipart"] and (m["faithfulness_auc"] is not None or faith["skipped"] > 0)
        assert m["causal_effect_logit"] is not None
        assert m["causal_verdict"] not in ("not measured", "no CI (one class)")  # measured over the 4 C2 classes
        assert m["paper_compat"] is False and m["mixture_paper_compat"] is False
    assert results["config"]["analysis"]["paper_compat"] is False
    circuits = results["extra"]["circuits"]  # the circuit classes are C2: no C1 subset
    assert {tuple(sorted(v)) for v in circuits.values()} == {("C2", "all")}
    assert all(v["C2"]["classes"] == 4 and len(v["all"]["wl_h2"]) == 6 for v in circuits.values())
    assert set(results["correlations"]) == {"cka_mid", "node_jaccard", "edge_jaccard", "feature_sharing"}
    assert results["correlations"]["cka_mid"]["rho"] is None
    assert [f["finding"] for f in results["findings"]][0] == "domain diversity helps DG and CG"
    report = (out / "tinymech" / "report.md").read_text()
    assert "## The paper's findings" in report and "| lod |" in report
    assert "- `cka_mid` in 2 row(s)" in report and "C2 rows 4 < 8" in report
    figures = {p.name for p in (out / "tinymech" / "figures").iterdir()}
    assert {"fig2_c2_accuracy.png", "circuit_jaccard.png", "feature_sharing.png", "sharedness_controls.png",
            "umap_by_domain.png", "sharedness_vs_c2.png", "accuracy_over_epochs.png"} <= figures


def test_local_study_from_each_runs_own_config(setup, capsys):
    root, data = setup
    out = root / "local"
    results = _study(root, data, out)
    _check(results, out)
    units = out / "tinymech" / "units"
    logs = sorted(p.parent.name.split("-")[0] for p in units.rglob("log.txt"))
    assert logs.count("extract") == 2 and logs.count("cka") == 2 and logs.count("sae") == 2
    capsys.readouterr()
    # a rerun finds every unit finished and recomputes nothing
    before = {p: p.stat().st_mtime_ns for p in units.rglob("result.json")}
    assert main(["experiment", "analyse", str(root / "mech.toml"), "--data", f"domainnet={data}", "--out", str(out)]) == 0
    assert "8/8 units finished, 0 to run" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in units.rglob("result.json")}


def test_slurm_launcher_through_submitit_local_executor(setup):
    """Training and every analysis stage go through submitit job arrays (its local executor, which starts
    every array task at once); the analysis is cut to one circuit class and no controls, which the local
    test above covers, so the launcher is what this test measures."""
    pytest.importorskip("submitit", reason="--launcher slurm needs the [slurm] extra (submitit)")
    root, data = setup
    out = root / "slurm"
    (root / "mech_slurm.toml").write_text(ANALYSIS + "circuit_classes = 1\ncontrols = false\n")
    common = ["--data", f"domainnet={data}", "--out", str(out), "--launcher", "slurm", "--submitit-cluster", "local"]
    assert main(["experiment", "run", str(root / "tiny.toml"), *common]) == 0
    assert main(["experiment", "analyse", str(root / "mech_slurm.toml"), *common]) == 0
    models = json.loads((out / "tinymech" / "results.json").read_text())["models"]
    assert sorted(m["setup"] for m in models) == ["cg_high", "lod"]
    for m in models:
        assert m["image_size"] == 64 and m["c2_classes"] == C2
        assert -1 <= m["node_jaccard"] <= 1 and -1 <= m["feature_sharing"] <= 1
        assert "causal_effect_logit" not in m  # controls = false: not measured, not invented
    jobs = {p.parents[2].name for p in out.rglob("submitit/*/*_submitted.pkl")}
    assert jobs == {"tiny", "tinymech"}


def test_unknown_analysis_key_names_the_valid_ones(setup, tmp_path, capsys):
    root, data = setup
    bad = root / "bad.toml"
    bad.write_text(ANALYSIS.replace("circuit_steps", "circuit_stepz"))
    assert main(["experiment", "analyse", str(bad), "--data", f"domainnet={data}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "[analysis]: unknown key 'circuit_stepz'; closest valid: 'circuit_steps'" in err
