"""`clipmech analyze cka|embeddings|sae|sharing` end to end on a tiny run over a fake DomainNet."""
import json

import pytest
import torch

from clipmech.cli import main
from clipmech.data import load_dataset
from clipmech.data.synthetic import write_fake_domainnet
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config
from clipmech.train.config import load_config, save_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    root = write_fake_domainnet(tmp / "dn")
    ds = load_dataset(str(root))
    cfg = load_config({"model": {"name": "tiny-rn", "image_size": 32}, "data": {"dataset": str(root)},
                       "mixture": {"test_domain": "quickdraw", "test_classes": ds.classes[:4]}})
    run = tmp / "run"
    run.mkdir()
    save_config(cfg, run / "config.toml")
    _, mcfg = resolve_config("tiny-rn")
    mcfg = {**mcfg, "vision_cfg": {**mcfg["vision_cfg"], "image_size": 32}}
    torch.manual_seed(0)
    model = HookedCLIP.from_config(mcfg)
    model.save_checkpoint(run / "epoch_0.pt")
    return run, ds


def test_cka_writes_json_and_one_figure_per_pair(run_dir, capsys):
    run, ds = run_dir
    assert main(["analyze", "cka", str(run), "--split", "train", "--kernels", "linear",
                 "--n-boot", "3", "--n-perm", "3", "--min-rows", "4"]) == 0  # 6 classes: below the default 8
    res = json.loads((run / "analysis" / "cka_centroid.json").read_text())
    assert res["pooling"] == "mean" and res["meta"]["epoch"] == 0 and "visual.hook_input" not in res["points"]
    assert set(res["results"]) == {"all", "C1", "C2"}
    pairs = res["results"]["all"]["linear"]
    assert len(pairs) == 15 and all(len(r["cka"]) == len(res["points"]) for r in pairs.values())
    assert len(list((run / "analysis" / "cka_centroid").glob("*.png"))) == 15
    assert "min" in capsys.readouterr().out
    # the activation cache is reused: a second analysis on the same rows computes nothing new
    n_cached = len(list((run / "analysis" / "cache").glob("*.pt")))
    assert main(["analyze", "cka", str(run), "--split", "train", "--mode", "image", "--kernels", "rbf",
                 "--n-boot", "2", "--n-perm", "2"]) == 0
    assert len(list((run / "analysis" / "cache").glob("*.pt"))) == n_cached
    assert json.loads((run / "analysis" / "cka_image.json").read_text())["mode"] == "image"


def test_embeddings_sae_sharing(run_dir, capsys):
    run, ds = run_dir
    assert main(["analyze", "embeddings", str(run), "--split", "all", "--per-domain", "12", "--no-densmap"]) == 0
    emb = json.loads((run / "analysis" / "embeddings.json").read_text())
    assert (run / "analysis" / "umap_without_quickdraw.png").exists() and emb["scores"]["overall"]["probe_accuracy"] >= 0
    assert main(["analyze", "sharing", str(run)]) == 1
    assert "clipmech analyze sae" in capsys.readouterr().err
    assert main(["analyze", "sae", str(run), "--expansion", "2", "--epochs", "3", "--l1", "1e-3"]) == 0
    sae = json.loads((run / "analysis" / "sae_hook_image_embed_normalized.json").read_text())
    dim = HookedCLIP.from_checkpoint(run / "epoch_0.pt").cfg["embed_dim"]
    assert 0 <= sae["metrics"]["fvu"] and sae["n_latents"] == 2 * dim
    # a dense "SAE" is flagged, a sparse one is not
    assert ("the SAE is not sparse" in capsys.readouterr().out) == (sae["metrics"]["l0"] >= dim)
    # a dense SAE is refused unless --allow-dense (the rule's boundary is pinned in test_analysis_controls)
    rc = main(["analyze", "sharing", str(run), "--split", "all"])
    assert rc == 0 or (rc == 1 and "--allow-dense" in capsys.readouterr().err)
    assert main(["analyze", "sharing", str(run), "--split", "all", "--allow-dense"]) == 0
    sh = json.loads((run / "analysis" / "sharing_hook_image_embed_normalized.json").read_text())
    assert len(sh["matrix"]) == 6 and sh["class_subset"] == "C2" and len(sh["classes"]) == 4
    assert sh["concepts"] and {"latent", "word", "cosine", "count"} <= set(sh["concepts"][0])
    assert (run / "analysis" / "sharing_hook_image_embed_normalized.png").exists()


def test_bad_input_messages(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert main(["analyze", "cka", str(tmp_path)]) == 1
    assert "config.toml" in capsys.readouterr().err
    assert main(["analyze", "cka", str(run), "--checkpoint", "7"]) == 1
    assert "available epochs: [0]" in capsys.readouterr().err
    assert main(["analyze", "embeddings", str(run), "--exclude", "skecth"]) == 1
    assert "'sketch'" in capsys.readouterr().err
