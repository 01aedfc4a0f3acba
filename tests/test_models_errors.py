"""HookedCLIP checkpoints, bad-input errors and hook hygiene (tiny presets)."""
import gc
import subprocess
import sys
import weakref

import pytest
import torch

from clipmech import HookedCLIP


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return HookedCLIP.from_config("tiny-rn")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _no_hooks_left(model: HookedCLIP) -> bool:
    return model.list_hooks() == {} and not any(
        hp._forward_hooks or hp._backward_hooks for hp in model.hook_dict.values())


# ---- checkpoints ----

@pytest.mark.parametrize("fmt", ["open_clip_train", "ddp_prefix", "plain", "clipmech"])
def test_checkpoint_round_trip(rn, images, tmp_path, fmt):
    clip = rn.to_open_clip()
    with torch.no_grad():  # change weights so the checkpoint differs from any fresh init
        clip.visual.attnpool.c_proj.weight.mul_(2)
        clip.ln_final.bias.add_(0.5)
    state = clip.state_dict()
    obj = {
        "open_clip_train": {"epoch": 3, "name": "2026_run", "state_dict": state, "optimizer": {"state": {}}},
        "ddp_prefix": {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}},
        "plain": state,
        "clipmech": {"epoch": 3, "name": "tiny-rn", "state_dict": state, "model_cfg": rn.cfg},
    }[fmt]
    path = tmp_path / "epoch_3.pt"
    torch.save(obj, path)
    name = None if fmt == "clipmech" else "tiny-rn"
    loaded = HookedCLIP.from_checkpoint(path, model_name=name)
    assert loaded.model_name == "tiny-rn" and loaded.cfg == rn.cfg
    tokens = loaded.tokenize(["a dog"])
    with torch.no_grad():
        assert (loaded.encode_image(images) - clip.encode_image(images)).abs().max() < 1e-5
        assert (loaded.encode_text(tokens) - clip.encode_text(tokens)).abs().max() < 1e-5


def test_checkpoint_without_config_needs_model_name(rn, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(rn.state_dict(), path)
    with pytest.raises(ValueError, match="model_name="):
        HookedCLIP.from_checkpoint(path)


def test_checkpoint_of_another_architecture(rn, tmp_path):
    path = tmp_path / "vit.pt"
    torch.save({"epoch": 1, "state_dict": HookedCLIP.from_config("tiny-vit").state_dict()}, path)
    with pytest.raises(ValueError) as err:
        HookedCLIP.from_checkpoint(path, model_name="tiny-rn")
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "visual.bn1.weight" in msg and "more)" in msg
    assert "unexpected keys" in msg and "visual.class_embedding" in msg
    assert "shape mismatches" in msg and "visual.conv1.weight" in msg


def test_checkpoint_with_python_objects_needs_trusted(rn, images, tmp_path):
    import numpy as np
    path = tmp_path / "latest.pt"
    torch.save({"epoch": 2, "state_dict": rn.state_dict(), "model_cfg": rn.cfg, "rng": np.random.get_state()}, path)
    with pytest.raises(ValueError, match="trusted=True"):
        HookedCLIP.from_checkpoint(path)
    loaded = HookedCLIP.from_checkpoint(path, trusted=True)
    assert torch.equal(loaded.encode_image(images), rn.encode_image(images))


def test_truncated_and_foreign_files(rn, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": rn.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    for path in (truncated, text, tensor):
        with pytest.raises(ValueError, match=str(path)):
            HookedCLIP.from_checkpoint(path, model_name="tiny-rn")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        HookedCLIP.from_checkpoint(tmp_path / "missing.pt", model_name="tiny-rn")


# ---- bad input ----

def test_wrong_image_shape_states_expected_shape(rn):
    for bad in (torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 64, 64), torch.zeros(3, 64, 64)):
        with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
            rn.encode_image(bad)
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        rn.encode_text(torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        rn.encode_text(torch.full((1, 32), 50000))


def test_unknown_names_list_closest(rn, images):
    typo = "visual.layer1.0.hook_otu"
    calls = [
        lambda: rn.run_with_cache(image=images, names_filter=typo),
        lambda: rn.run_with_cache(image=images, names_filter=[typo]),
        lambda: rn.run_with_hooks(image=images, fwd_hooks=[(typo, lambda t, hook: None)]),
        lambda: rn.run_with_hooks(image=images, bwd_hooks=[(typo, lambda t, hook: None)]),
        lambda: rn(image=images, stop_at=typo),
        lambda: rn.forward_from(typo, images),
        lambda: rn.hook_dict[typo],
        lambda: rn.add_hook(typo, lambda t, hook: None),
    ]
    for call in calls:
        with pytest.raises(KeyError, match="visual.layer1.0.hook_out"):
            call()
    with pytest.raises(KeyError, match="tiny-rn"):
        HookedCLIP.from_config("tiny-rnn")
    with pytest.raises(ValueError, match="bwd_hooks"):
        rn.run_with_cache(image=images, incl_bwd=True)
    with pytest.raises(KeyError, match="closest valid names"):
        rn.hook_names("vision")
    assert _no_hooks_left(rn)


# ---- hook hygiene ----

def test_exception_in_hook_or_forward_leaves_no_hook(rn, images):
    def boom(t, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        rn.run_with_hooks(image=images, fwd_hooks=[("visual.hook_act2", boom), ("visual.hook_act1", lambda t, hook: None)])
    assert _no_hooks_left(rn)
    with pytest.raises(RuntimeError, match="hook failed"):
        with rn.hooks(fwd_hooks=[("visual.attnpool.hook_pattern", boom)]):
            rn.run_with_cache(image=images)
    assert _no_hooks_left(rn)
    with pytest.raises(ValueError):  # error raised by the forward itself, with caching hooks attached
        rn.run_with_cache(image=torch.zeros(1, 3, 10, 10))
    assert _no_hooks_left(rn)
    rn.run_with_cache(image=images, stop_at="visual.hook_act3")
    assert _no_hooks_left(rn)


def test_no_reference_cycle_keeps_cache_alive(rn, images):
    gc.collect()
    gc.disable()  # anything still alive after `del` would need the cycle collector
    try:
        out, cache = rn.run_with_cache(image=images)
        refs = [weakref.ref(cache["visual.layer2.0.hook_out"]), weakref.ref(out[0])]
        del out, cache
        assert all(r() is None for r in refs)
        value = rn(image=images, stop_at="visual.layer3.0.hook_out")  # the stop exception carries a tensor
        ref = weakref.ref(value)
        del value
        assert ref() is None
    finally:
        gc.enable()


def test_import_clipmech_is_light():
    code = "import sys, clipmech; assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
