"""`clipmech analyze circuits|patching`: argument wiring and user errors (the full run is exercised
on a trained tiny model outside the test suite; see the issue report)."""
import argparse

import numpy as np

import pytest
import torch

from clipmech.analysis import cli_causal
from clipmech.data import samples
from clipmech.models import HookedCLIP
from clipmech.train.config import load_config, save_config


def _parser():
    parser = argparse.ArgumentParser()
    analyze = parser.add_subparsers().add_parser("analyze").add_subparsers()
    cli_causal.register(analyze)
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_config(load_config({"model": {"name": "tiny-rn", "image_size": 32}}), run / "config.toml")
    cfg = HookedCLIP.from_config("tiny-rn").cfg
    # the checkpoint matches its config's 32 px, as a trained run's does (the source refuses a mismatch)
    model = HookedCLIP.from_config({**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": 32}})
    torch.save({"epoch": 0, "name": "tiny-rn", "state_dict": model.state_dict(), "model_cfg": model.cfg},
               run / "epoch_0.pt")
    return run


@pytest.mark.parametrize("command", ["patching"])
def test_parses_and_rejects_unknown_domain(run_dir, command):
    args = _parser().parse_args(["analyze", command, str(run_dir), "--domains", "sketchh"])
    assert args.func in (cli_causal.run_circuits, cli_causal.run_patching)
    with pytest.raises(KeyError, match="'sketch'"):
        args.func(args)


def test_missing_epoch_and_run_dir_errors(run_dir, tmp_path):
    args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--checkpoint", "7"])
    with pytest.raises(FileNotFoundError, match=r"available epochs: \[0\]"):
        args.func(args)
    args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--n-draws", "0"])
    with pytest.raises(ValueError, match="--n-draws must be >= 1, got 0"):
        args.func(args)
    args = _parser().parse_args(["analyze", "patching", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="config.toml"):
        args.func(args)


def test_circuits_end_to_end_on_two_domains_and_two_classes(run_dir, capsys):
    """The whole `analyze circuits` path on a random tiny model: circuits, similarity, faithfulness,
    the causal test's JSON (emoji: discovery on training drawings, ablation on test drawings),
    printed line and figures (the numbers of a trained model are in the issue report)."""
    import json

    from clipmech.data import load_dataset
    ds = load_dataset("emoji")
    classes = list(ds.default_test_classes[:2])
    args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--domains", ds.default_test_domain, "flat",
                                 "--classes", *classes, "--n-images", "2", "--steps", "2", "--split", "all",
                                 "--n-draws", "2"])
    assert args.func(args) == 0
    out = run_dir / "analysis" / "circuits_epoch0"
    for name in ("circuit.png", "node_jaccard.png", "edge_jaccard.png", "wl_h2.png", "causal_ablation.png",
                 "faithfulness_per_point.png"):
        assert (out / name).stat().st_size > 1000
    sims = json.loads((out / "similarity.json").read_text())
    assert sims["domains"] == [ds.default_test_domain, "flat"]
    for name in ("node_jaccard", "edge_jaccard"):
        m = sims[name]["mean"]
        assert m[0][0] == m[1][1] == 1.0 and m[0][1] == m[1][0] and 0 <= m[0][1] <= 1
    faith = json.loads((out / "faithfulness.json").read_text())
    assert set(faith["per_class"]) == set(classes)
    assert len(faith["per_point_mean"]) == 2 and len(faith["per_point_mean"][0]) == len(faith["points"])
    assert not any(p.endswith("hook_input") for p in faith["points"])
    causal = json.loads((out / "causal_ablation.json").read_text())
    assert causal["test_domain"] == ds.default_test_domain and causal["other_domains"] == ["flat"]
    assert causal["discovery"] == "train" and causal["n_draws"] == 2 and 0 <= causal["trimmed_fraction"] <= 1
    for k, rows in causal["rows"].items():  # discovery: distinct training drawings; ablation: test drawings
        assert set(ds.split[rows["discovery"]]) == {"train"} and set(ds.view_idx[rows["discovery"]]) == {0}
        assert set(ds.split[rows["held_out"]]) == {"test"} and not set(rows["discovery"]) & set(rows["held_out"])
    assert len(causal["classes"]) + len(causal["skipped"]) == len(causal["rows"])
    for c in causal["per_class"].values():
        assert c["effect_logit"] == pytest.approx(c["drop_shared"][1] - c["drop_control"][1])
    assert causal["verdict"]["verdict"] in ("reproduced", "contradicted", "inconclusive", "inconclusive (borderline)",
                                            "no CI (one class)", "not measured")
    printed = capsys.readouterr().out.splitlines()
    line = next(x for x in printed if x.startswith("causal test on"))
    assert "discovered on distinct training-split drawings, ablated on the test-split drawings" in line
    assert "of shared nodes trimmed" in line and f"verdict: {causal['verdict']['verdict']}" in line
    # the study's placebo test on the same circuits and held-out drawings (one swap of the two classes)
    placebo = json.loads((out / "causal_placebo.json").read_text())
    assert len(placebo["classes"]) == 2 and placebo["derangements"] == [list(reversed(list(placebo["classes"])))]
    f = placebo["finding"]
    assert f["n_classes"] + sum(f["excluded"].values()) == 2
    for k, c in placebo["classes"].items():  # every held-out drawing of the class, the default null and strata
        assert c["n_images"] == len(causal["rows"][k]["held_out"])
        assert c["shared"]["mean"]["logit"]["randomisation"]["n"] == 200 and len(c["strata"]) == 4
    placebo_line = next(x for x in printed if x.startswith("placebo causal test on"))
    assert f": {f['verdict']} (one model" in placebo_line and f"{f['excluded']['unbalanced']} unbalanced" in placebo_line


def test_placebo_causal_test_with_one_class_is_skipped_and_says_why(run_dir, capsys):
    from clipmech.data import load_dataset
    ds = load_dataset("emoji")
    out = run_dir / "analysis" / "circuits_epoch0"
    (out / "causal_placebo.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "causal_placebo.json").write_text("{}")  # a previous run's result must not stay beside
    args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--domains", ds.default_test_domain, "flat",
                                 "--classes", ds.default_test_classes[0], "--n-images", "1", "--steps", "1",
                                 "--split", "all", "--n-draws", "1", "--no-faithfulness"])
    assert args.func(args) == 0
    # one class: no donor of another class, so no class is ready
    assert "placebo causal test skipped: 0 class(es) with held-out, matching" in capsys.readouterr().out
    assert not (out / "causal_placebo.json").exists()


def test_eap_ig_method_writes_its_own_circuits_and_never_reuses_the_papers(run_dir):
    import json

    from clipmech.analysis.circuit import Circuit
    from clipmech.data import load_dataset
    ds = load_dataset("emoji")
    common = ["--domains", ds.default_test_domain, "flat", "--classes", ds.default_test_classes[0], "--n-images", "1",
              "--steps", "2", "--split", "all", "--n-draws", "1", "--no-faithfulness", "--no-causal"]
    out = run_dir / "analysis" / "circuits_epoch0"
    for method in ("paper_ig", "eap_ig", "paper_ig"):
        args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--method", method, *common])
        assert args.func(args) == 0
        mine = [c for c in map(Circuit.load, (out / "circuits").rglob("*.json"))
                if c.meta["class"] == ds.default_test_classes[0]]
        assert len(mine) == 2 and {c.meta.get("method", "paper_ig") for c in mine} == {method}
    sims = json.loads((out / "similarity.json").read_text())
    assert sims["node_jaccard"]["mean"][0][0] == 1.0
    assert not (out / "causal_ablation.json").exists() and not (out / "causal_placebo.json").exists()


def test_patching_end_to_end_writes_rank_correlations_and_the_scatter(run_dir, capsys):
    import json

    from clipmech.data import load_dataset
    ds = load_dataset("emoji")
    args = _parser().parse_args(["analyze", "patching", str(run_dir), "--domains", ds.default_test_domain,
                                 "--source-domain", ds.natural_domain, "--classes", ds.default_test_classes[0],
                                 "--n-images", "1", "--steps", "2", "--split", "all"])
    assert args.func(args) == 0
    out = run_dir / "analysis" / "patching_epoch0"
    res = json.loads((out / "patching.json").read_text())
    assert res["source_domain"] == ds.natural_domain and len(res["pairs"]) == 1
    pair = res["pairs"][0]
    assert pair["domain"] == ds.default_test_domain and pair["n_images"] == 1
    for point, entry in pair["points"].items():
        assert not point.endswith("hook_input")
        assert all(v is None or -1 <= v <= 1 for v in entry.values())
    assert (out / "patching.png").read_bytes()[:4] == b"\x89PNG"
    assert "attribution vs exact, mean Spearman over points" in capsys.readouterr().out


def test_causal_cells_split_is_disjoint_seeded_per_cell_and_skips_small_cells():
    from clipmech.data.dataset import DomainDataset
    # cell (a, x): 5 test images, (a, y): 1, (b, x): 4 test + 2 train
    dom = [0] * 5 + [0] + [1] * 6
    cls = [0] * 5 + [1] + [0] * 6
    split = ["test"] * 6 + ["test"] * 4 + ["train"] * 2
    ds = DomainDataset("toy", ["a", "b"], ["x", "y"], dom, cls, split, images=np.zeros((12, 4, 4, 3), np.uint8),
                       natural_domain="a")
    assert samples.discovery_mode(ds, "auto") == "split" and samples.discovery_mode(ds, "train") == "train"
    cells, skipped = samples.causal_cells(ds, ["a", "b"], ["x", "y"], "split", n_max=50, seed=3)
    assert skipped == ["a/y", "b/y"] and set(cells) == {("a", "x"), ("b", "x")}
    (disc, held), (disc_b, held_b) = cells["a", "x"], cells["b", "x"]
    assert (len(disc), len(held), len(disc_b), len(held_b)) == (3, 2, 2, 2)  # ceil / floor halves
    assert sorted(np.concatenate([disc, held])) == [0, 1, 2, 3, 4] and set(ds.split[disc_b]) == {"test"}
    alone, _ = samples.causal_cells(ds, ["a"], ["x"], "split", n_max=50, seed=3)
    assert all((alone["a", "x"][i] == cells["a", "x"][i]).all() for i in range(2))  # independent of other cells
    assert len(samples.causal_cells(ds, ["a"], ["x"], "split", n_max=1, seed=3)[0]["a", "x"][0]) == 1
    train, skipped = samples.causal_cells(ds, ["a", "b"], ["x"], "train", n_max=50, seed=3)
    assert skipped == ["a/x"] and set(ds.split[train["b", "x"][0]]) == {"train"}
