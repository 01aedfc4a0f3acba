"""HookedCLIP.from_pretrained (open_clip's loader: names, presets, weight files, tags) and
HookedCLIP.from_hf (transformers CLIPModel) give the numbers of the model they load. Offline: every
weight file is a randomly initialised model saved by the test."""
import os

import open_clip
import pytest
import torch
from PIL import Image

from clipmech.errors import CheckpointError
from clipmech.models import HookedCLIP

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _inputs(model: HookedCLIP):
    torch.manual_seed(1)
    images = torch.randn(3, 3, model.image_size, model.image_size)
    return images, model.tokenize(["a photo of a dog", "a sketch", "painting of a red apple on a table"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_from_pretrained_file_matches_open_clips_own_model(tiny_open_clip_name, tmp_path, suffix):
    torch.manual_seed(0)
    ref = open_clip.create_model(tiny_open_clip_name).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": ref.state_dict()}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    theirs = open_clip.create_model(tiny_open_clip_name, pretrained=str(path)).eval()
    ours = HookedCLIP.from_pretrained(tiny_open_clip_name, pretrained=path)
    images, text = _inputs(ours)
    with torch.no_grad():
        d_img = _max_diff(ours.encode_image(images), theirs.encode_image(images))
        d_txt = _max_diff(ours.encode_text(text), theirs.encode_text(text))
    print(f"from_pretrained parity ({suffix}): image {d_img:.2e}, text {d_txt:.2e}")
    assert d_img < 1e-5 and d_txt < 1e-5
    assert not ours.training and ours.model_name == tiny_open_clip_name
    # the weights really came from the file (not a fresh random init)
    assert torch.equal(ours.state_dict()["visual.conv1.weight"], ref.state_dict()["visual.conv1.weight"])


def test_from_pretrained_preset_and_open_clip_options(tiny_open_clip_name, tmp_path):
    torch.manual_seed(0)
    ref = HookedCLIP.from_config("tiny-vit")
    path = tmp_path / "tiny-vit.pt"
    torch.save(ref.to_open_clip().state_dict(), path)
    ours = HookedCLIP.from_pretrained("tiny-vit", pretrained=path)
    images, text = _inputs(ours)
    with torch.no_grad():
        assert _max_diff(ours.encode_image(images), ref.encode_image(images)) < 1e-5
        assert _max_diff(ours.encode_text(text), ref.encode_text(text)) < 1e-5
    # open_clip kwargs pass through: QuickGELU forced, and kept by to_open_clip
    torch.save(open_clip.create_model(tiny_open_clip_name).state_dict(), tmp_path / "rn.pt")
    quick = HookedCLIP.from_pretrained(tiny_open_clip_name, tmp_path / "rn.pt", force_quick_gelu=True)
    assert isinstance(quick.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert isinstance(quick.to_open_clip().transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    # the preprocessing of the weights is exposed
    assert quick.preprocess_cfg["size"] in (32, (32, 32)) and quick.preprocess_cfg["mean"] == open_clip.OPENAI_DATASET_MEAN
    assert quick.image_transform()(Image.new("RGB", (70, 50))).shape == (3, 32, 32)


def test_openai_tags_get_quick_gelu_and_hub_ids_route_to_open_clip(monkeypatch, tiny_open_clip_name):
    calls, real = [], open_clip.create_model

    def fake_create_model(name, pretrained=None, **kwargs):  # no download: record what open_clip is asked
        calls.append((name, pretrained, kwargs))
        return real(tiny_open_clip_name, force_quick_gelu=kwargs.get("force_quick_gelu", False))

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    m = HookedCLIP.from_pretrained("RN50", pretrained="openai")
    assert calls[-1][:2] == ("RN50", "openai") and calls[-1][2]["force_quick_gelu"] is True
    assert isinstance(m.visual, open_clip.modified_resnet.ModifiedResNet)
    HookedCLIP.from_pretrained("ViT-B-32", pretrained="laion2b_s34b_b79k")  # trained without QuickGELU
    assert "force_quick_gelu" not in calls[-1][2]
    HookedCLIP.from_pretrained("RN50", pretrained="openai", force_quick_gelu=False)  # the caller decides
    assert calls[-1][2]["force_quick_gelu"] is False
    HookedCLIP.from_pretrained(None, pretrained="hf-hub:someone/some-clip")
    assert calls[-1][:2] == ("hf-hub:someone/some-clip", None)


def test_from_pretrained_errors(tiny_open_clip_name, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a pretrained tag of RN50.*openai"):
        HookedCLIP.from_pretrained("RN50", pretrained=tmp_path / "missing.pt")
    with pytest.raises(KeyError, match="unknown model 'RN5O'.*'RN50'"):
        HookedCLIP.from_pretrained("RN5O", pretrained="openai")
    with pytest.raises(ValueError, match="needs pretrained=.*from_config"):
        HookedCLIP.from_pretrained("RN50")
    with pytest.raises(FileNotFoundError, match="preset 'tiny-rn' has no pretrained tags"):
        HookedCLIP.from_pretrained("tiny-rn", pretrained="openai")
    torch.save(HookedCLIP.from_config("tiny-vit").to_open_clip().state_dict(), tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match=r"vit.pt \(preset tiny-rn\) does not match the architecture"):
        HookedCLIP.from_pretrained("tiny-rn", pretrained=tmp_path / "vit.pt")


# ------------------------------------------------------------------------------------ transformers
transformers = pytest.importorskip("transformers", reason="from_hf needs the hf extra (transformers)")


def _tiny_hf(eos_token_id: int, act: str = "quick_gelu"):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0,
                         hidden_act=act),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24)
    torch.manual_seed(0)
    return transformers.CLIPModel(cfg).eval()


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 returns an output object


@pytest.mark.parametrize("eos,act", [(999, "quick_gelu"), (2, "gelu")])
def test_from_hf_matches_transformers_features(tmp_path, eos, act):
    hf = _tiny_hf(eos, act)
    hf.save_pretrained(tmp_path / "clip")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    ours = HookedCLIP.from_hf(tmp_path / "clip")
    assert ours.context_length == 16 and ours.image_size == 32 and ours.cfg["embed_dim"] == 24
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(3, 990, (4, 16), generator=g)
    for row, end in enumerate((5, 9, 15, 2)):  # eos at different places, random ids after it
        ids[row, end] = 999 if eos == 999 else 995  # legacy configs pool at the highest id
    with torch.no_grad():
        d_img = _max_diff(ours.encode_image(images), _features(hf.get_image_features(pixel_values=images)))
        d_txt = _max_diff(ours.encode_text(ids), _features(hf.get_text_features(input_ids=ids)))
        scale = hf.logit_scale.exp().item()
    print(f"from_hf parity (eos {eos}, {act}): image {d_img:.2e}, text {d_txt:.2e}")
    assert d_img < 1e-5 and d_txt < 1e-5
    assert abs(ours.logit_scale.exp().item() - scale) < 1e-6
    # a hooked forward sees the converted model's layers
    _, cache = ours.run_with_cache(image=images, names_filter="visual.blocks.1.attn.hook_pattern")
    assert cache["visual.blocks.1.attn.hook_pattern"].shape == (4, 3, 17, 17)
    # this model's vocabulary is not open_clip's: tokenize's ids are refused with the fix named
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1000\)"):
        ours.encode_text(ours.tokenize(["a photo of a dog"]))


def test_from_hf_refuses_what_it_cannot_convert():
    hf = _tiny_hf(999)
    hf.config.vision_config.hidden_act = "relu"
    with pytest.raises(ValueError, match="unsupported activations"):
        HookedCLIP.from_hf(hf)
    with pytest.raises(ValueError, match="needs a transformers CLIPModel"):
        HookedCLIP.from_hf(torch.nn.Linear(2, 2))
