"""`clipmech analyze circuits|patching`: argument wiring and user errors (the full run is exercised
on a trained tiny model outside the test suite; see the issue report)."""
import argparse

import pytest
import torch

from clipmech.analysis import cli_causal
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
    model = HookedCLIP.from_config({**HookedCLIP.from_config("tiny-rn").cfg})
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
    args = _parser().parse_args(["analyze", "patching", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="config.toml"):
        args.func(args)


def test_circuits_end_to_end_on_two_domains_and_two_classes(run_dir):
    """The whole `analyze circuits` path on a random tiny model: circuits, similarity, faithfulness,
    the causal test's JSON, figures (the numbers of a trained model are in the issue report)."""
    import json

    from clipmech.data import load_dataset
    ds = load_dataset("emoji")
    classes = list(ds.default_test_classes[:2])
    args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--domains", ds.default_test_domain, "flat",
                                 "--classes", *classes, "--n-images", "2", "--steps", "2", "--split", "all",
                                 "--n-random", "2"])
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
    for head in ("all_classes", "c2_classes_only"):
        res = causal[head]
        assert res["n_images"] == sum(pc["n_images"] for pc in res["per_class"].values())
        assert set(res["conditions"]) == {"shared", "unshared", "random", "shared_all", "random_all"}
        for v in res["conditions"].values():
            assert v["drop_ci95"][0] <= v["drop"] <= v["drop_ci95"][1]
