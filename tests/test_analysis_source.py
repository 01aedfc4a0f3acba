"""`clipmech analyze` on any CLIP: --model NAME --pretrained FILE / --hf PATH instead of a run
directory, with --dataset, --classes and --out; the choice of model is checked before any work."""
import json

import pytest
import torch

from clipmech.analysis.source import load_source
from clipmech.cli import build_parser, main
from clipmech.data import load_dataset
from clipmech.models import HookedCLIP


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised tiny-rn saved the way open_clip saves weights (a plain state dict)."""
    path = tmp_path_factory.mktemp("weights") / "tiny-rn.pt"
    torch.manual_seed(0)
    torch.save(HookedCLIP.from_config("tiny-rn").to_open_clip().state_dict(), path)
    return path


def test_sae_and_sharing_end_to_end_from_pretrained_weights_on_emoji(weights, tmp_path, capsys):
    ds = load_dataset("emoji")
    c2 = list(ds.classes[:4])
    out = tmp_path / "tiny-rn-pretrained"
    source = ["--model", "tiny-rn", "--pretrained", str(weights), "--dataset", "emoji", "--out", str(out)]
    assert main(["analyze", "sharing", *source]) == 1  # no SAE yet: the hint names this model, not a run
    assert f"clipmech analyze sae --model tiny-rn --pretrained {weights}" in capsys.readouterr().err
    assert main(["analyze", "sae", *source, "--split", "test", "--expansion", "1", "--epochs", "2"]) == 0
    sae = json.loads((out / "sae_hook_image_embed_normalized.json").read_text())
    assert sae["meta"]["model"] == "tiny-rn" and sae["meta"]["pretrained"] == str(weights)
    assert sae["meta"]["n_images"] == len(ds.indices(split="test")) and "run_dir" not in sae["meta"]
    assert main(["analyze", "sharing", *source, "--split", "test", "--classes", *c2]) == 0
    sh = json.loads((out / "sharing_hook_image_embed_normalized.json").read_text())
    assert sh["classes"] == c2 and sh["class_subset"] == "C2" and len(sh["matrix"]) == len(ds.domains)
    assert sh["test_domain"] == ds.default_test_domain and sh["concepts"]  # concept names use the text tower
    assert (out / "sharing_hook_image_embed_normalized.png").exists() and list((out / "cache").glob("*.pt"))


def _args(*words):
    return build_parser().parse_args(["analyze", "cka", *map(str, words)])


def test_one_model_source_is_required_and_named_in_errors(weights, tmp_path):
    cases = [((tmp_path, "--model", "tiny-rn", "--pretrained", weights), "give one model: RUN_DIR, --model"),
             (("--model", "tiny-rn", "--hf", tmp_path), "got --model, --hf"),
             (("--pretrained", weights), "--pretrained needs --model"),
             ((), "nothing to analyse"),
             (("--model", "tiny-rn", "--pretrained", weights, "--out", tmp_path), "--model needs --dataset"),
             (("--model", "tiny-rn", "--pretrained", weights, "--dataset", "emoji"), "--model needs --out"),
             (("--model", "tiny-rn", "--pretrained", weights, "--dataset", "emoji", "--out", tmp_path,
               "--checkpoint", 3), "--checkpoint picks an epoch of a RUN_DIR")]
    for words, message in cases:
        with pytest.raises(ValueError, match=message):
            load_source(_args(*words))
    with pytest.raises(FileNotFoundError, match="preset 'tiny-rn' has no pretrained tags"):
        load_source(_args("--model", "tiny-rn", "--pretrained", tmp_path / "nope.pt", "--dataset", "emoji",
                          "--out", tmp_path))


def test_sources_key_their_caches_by_weight_content(weights, tmp_path):
    common = ("--dataset", "emoji", "--out", tmp_path)
    a = load_source(_args("--model", "tiny-rn", "--pretrained", weights, *common))
    copy = tmp_path / "copy.pt"
    copy.write_bytes(weights.read_bytes())
    assert load_source(_args("--model", "tiny-rn", "--pretrained", copy, *common)).model_key == a.model_key
    torch.manual_seed(1)
    torch.save(HookedCLIP.from_config("tiny-rn").to_open_clip().state_dict(), copy)
    assert load_source(_args("--model", "tiny-rn", "--pretrained", copy, *common)).model_key != a.model_key
    assert a.c2 == list(a.dataset.default_test_classes) and a.test_domain == a.dataset.default_test_domain
    assert a.epoch is None and a.label == "pretrained" and a.out == tmp_path


def test_hf_source(tmp_path):
    transformers = pytest.importorskip("transformers", reason="--hf needs the hf extra (transformers)")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=999, bos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "hf")
    src = load_source(_args("--hf", tmp_path / "hf", "--dataset", "emoji", "--out", tmp_path / "out"))
    assert src.meta == {"hf": str(tmp_path / "hf")} and src.model.analysis_points()[0] == "visual.hook_embed"
    assert src.model_key.startswith("model:")


def test_analyse_is_an_alias_of_analyze():
    args = build_parser().parse_args(["analyse", "sharing", "--model", "RN50", "--pretrained", "openai",
                                      "--subset", "all"])
    assert args.command in ("analyze", "analyse") and args.subset == "all" and args.model == "RN50"
    assert build_parser().parse_args(["experiment", "analyse", "x.toml"]).action == "analyze"
