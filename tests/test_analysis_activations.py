"""Activation extraction: parity with a direct run_with_cache, pooling rules, on-disk reuse."""
import numpy as np
import pytest
import torch

from clipmech.analysis.activations import extract_activations, pool
from clipmech.data.dataset import DomainDataset
from clipmech.models import HookedCLIP


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = HookedCLIP.from_config("tiny-rn")
    rng = np.random.default_rng(0)
    ds = DomainDataset("toy", ["real", "sketch"], ["cat", "dog"], domain_idx=np.array([0, 0, 1, 1, 0, 1]),
                       class_idx=np.array([0, 1, 0, 1, 1, 0]), split=np.array(["test"] * 6),
                       images=rng.integers(0, 255, size=(6, 24, 24, 3), dtype=np.uint8))
    return model, ds


def test_matches_direct_cache_and_reuses_disk(tiny, tmp_path, monkeypatch):
    model, ds = tiny
    pts = ["visual.hook_act1", "visual.layer2.0.hook_out", "hook_image_embed"]
    got = extract_activations(model, ds, pts, pooling="mean", batch_size=4, cache_dir=tmp_path)
    tf = model.image_transform()
    images = torch.stack([tf(ds.load_image(i)) for i in range(len(ds))])
    with torch.no_grad():
        _, cache = model.run_with_cache(image=images, names_filter=pts)
        emb = model.encode_image(images)
    assert torch.allclose(got["visual.hook_act1"], cache["visual.hook_act1"].mean((2, 3)), atol=1e-5)
    assert got["visual.layer2.0.hook_out"].shape == (6, cache["visual.layer2.0.hook_out"].shape[1])
    assert torch.allclose(got["hook_image_embed"], emb, atol=1e-5)
    # second call: everything comes from disk, the model is never run
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    again = extract_activations(model, ds, pts, pooling="mean", cache_dir=tmp_path)
    assert all(torch.equal(again[p], got[p]) for p in pts)
    # a different subset of rows is a different key (and would need the model)
    with pytest.raises(AssertionError, match="ran"):
        extract_activations(model, ds, pts[:1], pooling="mean", indices=np.array([0, 1]), cache_dir=tmp_path)


def test_only_missing_points_run_and_stop_early(tiny, tmp_path, monkeypatch):
    model, ds = tiny
    extract_activations(model, ds, ["visual.hook_act1"], pooling="mean", cache_dir=tmp_path)
    calls = []
    real = model.run_with_cache

    def spy(*a, **k):
        calls.append((tuple(k["names_filter"]), k["stop_at"]))
        return real(*a, **k)
    monkeypatch.setattr(model, "run_with_cache", spy)
    out = extract_activations(model, ds, ["visual.hook_act1", "visual.hook_act2"], pooling="none", cache_dir=tmp_path)
    assert calls and all(c == (("visual.hook_act1", "visual.hook_act2"), "visual.hook_act2") for c in calls)
    calls.clear()
    extract_activations(model, ds, ["visual.hook_act1", "visual.hook_act3"], pooling="mean", cache_dir=tmp_path)
    assert calls and all(c == (("visual.hook_act3",), "visual.hook_act3") for c in calls)
    assert out["visual.hook_act2"].ndim == 2


def test_pooling_rules_and_errors(tiny):
    model, ds = tiny
    assert pool(torch.ones(2, 3, 4, 4), "mean").shape == (2, 3)
    toks = torch.arange(24.).reshape(2, 3, 4)
    assert torch.equal(pool(toks, "cls"), toks[:, 0]) and torch.equal(pool(toks, "mean"), toks.mean(1))
    assert pool(toks, "none").shape == (2, 12)
    with pytest.raises(ValueError, match="token sequence"):
        pool(torch.ones(2, 3, 4, 4), "cls")
    with pytest.raises(KeyError, match="pooling"):
        pool(toks, "max")
    with pytest.raises(KeyError, match="visual.hook_act1"):
        extract_activations(model, ds, ["visual.hook_actl"], pooling="mean")
    with pytest.raises(KeyError, match="image hook point"):
        extract_activations(model, ds, ["text.hook_embed"], pooling="mean")
