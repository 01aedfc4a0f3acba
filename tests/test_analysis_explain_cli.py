"""`clipmech analyze saliency|explain` end to end on tiny random models (a run directory, --model
tiny-vit --pretrained FILE): the files they write, the circuit-node selection, and the one-line
errors of issue 29 (missing / empty --vocab, a node that does not exist, no circuits, a point
without spatial positions)."""
import json

import numpy as np
import pytest
import torch

from clipmech.analysis.circuits import Circuit
from clipmech.cli import main
from clipmech.models import HookedCLIP
from clipmech.train.config import load_config, save_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_config(load_config({"model": {"name": "tiny-rn", "image_size": 32}}), run / "config.toml")
    torch.manual_seed(0)
    model = HookedCLIP.from_config({**HookedCLIP.from_config("tiny-rn").cfg, "vision_cfg": {
        **HookedCLIP.from_config("tiny-rn").cfg["vision_cfg"], "image_size": 32}})
    model.save_checkpoint(run / "epoch_0.pt")
    return run


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("balloon\nbanana\nxyzzy\n")  # xyzzy is in no emoji caption
    return path


SMALL = ["--n-images", "1", "--pool", "1", "--top", "1"]


def test_explain_requested_nodes_writes_explanations_thumbnails_and_figure(run_dir, vocab, tmp_path, capsys):
    out = tmp_path / "out"
    nodes = ["visual.layer3.0.hook_out/1", "visual.attnpool.hook_out/1"]
    assert main(["analyze", "explain", str(run_dir), "--out", str(out), "--nodes", *nodes, "--vocab", str(vocab),
                 "--labels", "2", *SMALL]) == 0
    folder = out / "explain_epoch0"
    doc = json.loads((folder / "explanations.json").read_text())
    assert doc["format"] == "clipmech.explanations/1"
    assert doc["meta"]["vocabulary"]["n_words"] == 2 and doc["meta"]["vocabulary"]["dropped"] == 1
    assert [n["node"] for n in doc["nodes"]] == nodes
    assert [n["method"] for n in doc["nodes"]] == ["total", "direct"]
    first = doc["nodes"][0]
    assert {x["word"] for x in first["labels"]} <= {"balloon", "banana"} and len(first["labels"]) == 2
    assert 0 <= first["explained"] <= first["ceiling"] + 1e-6 and first["chance"] == pytest.approx(2 / 64)
    assert set(first["domains"]) == set(first["top_examples"]) and len(first["domains"]) == 6
    example = first["top_examples"]["sketch"][0]
    assert (folder / example["thumbnail"]).is_file() and example["source"].startswith("emoji:")
    assert (folder / "nodes_requested.png").is_file()
    assert "visual.layer3.0.hook_out/1" in capsys.readouterr().out


def _circuit(domain, cls, nodes):
    points = ["visual.hook_input", "visual.layer3.0.hook_out"]
    scores = {"visual.hook_input": torch.zeros(3), "visual.layer3.0.hook_out": torch.arange(256.0)}
    return Circuit(points, scores, {"visual.hook_input": [0], "visual.layer3.0.hook_out": nodes}, [],
                   {"domain": domain, "class": cls})


def test_explain_picks_shared_and_test_domain_only_circuit_nodes(run_dir, vocab, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "explain", str(run_dir), "--out", str(out), "--vocab", str(vocab), *SMALL]
    assert main(args) == 1
    assert "clipmech analyze circuits" in capsys.readouterr().err  # no circuits: the command to run is named
    folder = out / "circuits_epoch0" / "circuits"
    for domain, nodes in (("quickdraw", [5, 9, 200]), ("sketch", [9, 7]), ("real", [200])):
        _circuit(domain, "balloon", nodes).save(folder / domain / "balloon.json")
    assert main(args + ["--max-nodes", "1"]) == 0
    doc = json.loads((out / "explain_epoch0" / "explanations.json").read_text())
    # shared: 9 and 200 (200 has the higher score); test domain only: 5
    assert [(n["node"], n["group"]) for n in doc["nodes"]] == [("visual.layer3.0.hook_out/200", "shared"),
                                                               ("visual.layer3.0.hook_out/5", "test_domain_only")]
    assert doc["meta"]["circuits"]["n_shared"] == 2 and doc["meta"]["circuits"]["classes"] == ["balloon"]
    assert (out / "explain_epoch0" / "nodes_shared.png").is_file()


def test_saliency_writes_maps_and_rejects_a_point_without_positions(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    src = ["analyze", "saliency", str(run_dir), "--out", str(out), "--n-images", "1", "--steps", "2"]
    assert main(src + ["--nodes", "visual.layer2.0.hook_out/4"]) == 0
    arrays = np.load(out / "saliency_epoch0" / "saliency.npz")
    n = len(arrays["rows"])
    assert n == 6 and arrays["input_ig"].shape == arrays["grad_cam"].shape == arrays["node_ig"].shape == (n, 32, 32)
    meta = json.loads((out / "saliency_epoch0" / "saliency.json").read_text())
    assert meta["cam_point"] == "visual.layer3.0.hook_out"  # at 32 px layer4 is 1x1: no positions to map
    assert all((out / "saliency_epoch0" / p).is_file() for p in meta["images"])
    capsys.readouterr()
    assert main(src + ["--point", "visual.attnpool.hook_out"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no spatial positions; choose a spatial point" in err


@pytest.mark.parametrize("extra,message", [
    (["--vocab", "{tmp}/missing.txt"], "vocabulary file .*missing.txt not found"),
    (["--vocab", "{tmp}/empty.txt"], "holds no words"),
    (["--nodes", "visual.layer3.0.hook_out/999"], r"does not exist: visual.layer3.0.hook_out has 256 nodes \(0..255\)"),
    (["--nodes", "visual.layer9.hook_out/1"], "not a hook point|unknown hook point|hook point"),
])
def test_bad_input_is_one_line(run_dir, tmp_path, capsys, extra, message):
    import re
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "--nodes" not in args:
        args += ["--nodes", "visual.layer3.0.hook_out/1"]
    assert main(["analyze", "explain", str(run_dir), "--out", str(tmp_path / "out"), *args, *SMALL]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and re.search(message, err)


def test_explain_labels_vit_heads_by_textspan_from_pretrained_weights(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "tiny-vit.pt"
    torch.save(HookedCLIP.from_config("tiny-vit").to_open_clip().state_dict(), weights)
    out = tmp_path / "vit"
    assert main(["analyze", "explain", "--model", "tiny-vit", "--pretrained", str(weights), "--dataset", "emoji",
                 "--out", str(out), "--nodes", "visual.blocks.1.attn.hook_z/0", "--vocab", str(tmp_path / "w.txt"),
                 *SMALL]) == 1  # the vocabulary file does not exist yet
    (tmp_path / "w.txt").write_text("dog\nviolin\nboat\n")
    assert main(["analyze", "explain", "--model", "tiny-vit", "--pretrained", str(weights), "--dataset", "emoji",
                 "--out", str(out), "--nodes", "visual.blocks.1.attn.hook_z/0", "--vocab", str(tmp_path / "w.txt"),
                 *SMALL]) == 0
    doc = json.loads((out / "explain_pretrained" / "explanations.json").read_text())
    node = doc["nodes"][0]
    assert node["method"] == "textspan" and doc["meta"]["vocabulary"]["dropped"] == 0  # not a run: all words kept
    assert node["top_examples"]["real"][0]["thumbnail"].endswith(".png")
