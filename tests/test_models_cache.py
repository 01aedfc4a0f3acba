"""ClipActivationCache on both architectures: what run_with_cache returns, its fast path for every
supported keyword, batch slicing, remove_batch_dim, to, stacking, and the clear errors for
TransformerLens helpers that assume a language model."""
import pytest
import torch
from transformer_lens import HookedRootModule

from clipmech import HookedCLIP
from clipmech.models.activation_cache import LANGUAGE_MODEL_ONLY, ClipActivationCache


@pytest.fixture(scope="module", params=["tiny-rn", "tiny-vit"])
def model(request):
    torch.manual_seed(0)
    return HookedCLIP.from_config(request.param)


@pytest.fixture(scope="module")
def run(model):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, model.image_size, model.image_size, generator=g)
    text = model.tokenize(["a photo of a dog", "a sketch of a bicycle", "a painting of a cat"])
    _, cache = model.run_with_cache(image=images, text=text)
    return images, text, cache


@pytest.fixture
def no_slow_path(monkeypatch):
    """Fail if TransformerLens' hook-based caching runs (the slow path)."""
    def slow(*args, **kwargs):
        raise AssertionError("TransformerLens' run_with_cache ran")
    monkeypatch.setattr(HookedRootModule, "run_with_cache", slow)


def test_cache_is_a_dict_of_every_point_in_forward_order(model, run):
    images, text, cache = run
    assert isinstance(cache, ClipActivationCache) and isinstance(cache, dict)
    assert list(cache) == model.hook_names()
    assert cache.batch_size() == 3 and cache.has_batch_dim
    _, plain = model.run_with_cache(image=images, names_filter="hook_image_embed", return_cache_object=False)
    assert type(plain) is dict and list(plain) == ["hook_image_embed"]
    with pytest.raises(KeyError, match="hook_image_embed"):
        cache["hook_image_embedd"]


def test_every_keyword_takes_the_fast_path(model, run, no_slow_path):
    images, text, cache = run
    names = [model.analysis_points()[2], "hook_text_embed"]
    _, one = model.run_with_cache(image=images[1:2], text=text[1:2], names_filter=names, device="cpu",
                                  remove_batch_dim=True)
    assert list(one) == names and not one.has_batch_dim
    for n in names:
        assert one[n].shape == cache[n].shape[1:]
        torch.testing.assert_close(one[n], cache[n][1], rtol=1e-5, atol=1e-5)
    value, stopped = model.run_with_cache(image=images, names_filter=lambda n: n.startswith("visual."),
                                          stop_at=model.analysis_points()[1])
    torch.testing.assert_close(value, cache[model.analysis_points()[1]])
    assert list(stopped) == model.hook_names()[:model.hook_names().index(model.analysis_points()[1]) + 1]


def test_hooked_points_are_cached_after_their_hooks(model, run):
    images, _, cache = run
    point = model.analysis_points()[2]
    with model.hooks(fwd_hooks=[(point, lambda t, hook: 2 * t)]):
        _, hooked = model.run_with_cache(image=images, names_filter=[point, "hook_image_embed"])
    torch.testing.assert_close(hooked[point], 2 * cache[point])
    assert isinstance(hooked, ClipActivationCache) and list(hooked) == [point, "hook_image_embed"]


def test_batch_slicing_and_remove_batch_dim(model, run):
    _, _, cache = run
    name = model.analysis_points()[-1]
    part = cache[1:3]
    assert isinstance(part, ClipActivationCache) and part.batch_size() == 2 and list(part) == list(cache)
    assert torch.equal(part[name], cache[name][1:3])
    picked = cache[[2, 0]]
    assert torch.equal(picked[name], cache[name][torch.tensor([2, 0])])
    single = cache[0]
    assert not single.has_batch_dim and torch.equal(single[name], cache[name][0])
    assert all(torch.equal(a, b) for a, b in zip(cache[0:1].remove_batch_dim().values(), single.values()))
    with pytest.raises(ValueError, match="needs a batch of 1, this cache holds 3"):
        cache.remove_batch_dim()
    with pytest.raises(ValueError, match="no batch dimension"):
        single[0]
    with pytest.raises(IndexError, match="batch index 3 out of range"):
        cache[3]
    with pytest.raises(ValueError, match="remove_batch_dim needs a batch of 1"):
        model.run_with_cache(image=torch.zeros(2, 3, model.image_size, model.image_size), remove_batch_dim=True)


def test_to_moves_and_casts(model, run):
    _, text, cache = run
    double = cache.to("cpu", torch.float64)
    name = model.analysis_points()[0]
    assert double[name].dtype == torch.float64 and cache[name].dtype == torch.float32
    torch.testing.assert_close(double[name], cache[name].double())
    assert cache.to(dtype=torch.float64).has_batch_dim and not cache[0].to(dtype=torch.float64).has_batch_dim


def test_stack_activation(model, run):
    _, _, cache = run
    if "visual.blocks.0.hook_resid_post" in cache:  # ViT: one residual width, so every block stacks
        stacked, names = cache.stack_activation("hook_resid_post", return_labels=True)
        assert names == [f"visual.blocks.{i}.hook_resid_post" for i in range(len(names))] and len(names) >= 2
        assert stacked.shape == (len(names), *cache[names[0]].shape)
        assert torch.equal(stacked[-1], cache[names[-1]])
        text = cache.stack_activation("attn.hook_pattern", tower="text")
        assert text.shape[0] == len(cache.block_names("attn.hook_pattern", "text"))
    else:  # ResNet: the stages differ in shape, so stacking them all is an error naming the shapes
        with pytest.raises(ValueError, match="different shapes"):
            cache.stack_activation("hook_out")
        stage = [n for n in cache.block_names("hook_out") if n.startswith("visual.layer1.")]
        assert cache.stack(stage).shape == (len(stage), *cache[stage[0]].shape)
    with pytest.raises(KeyError, match="no cached per-block point"):
        cache.stack_activation("hook_nothing")


def test_language_model_helpers_raise_clear_errors(model, run):
    _, _, cache = run
    for name in sorted(LANGUAGE_MODEL_ONLY)[:4]:
        with pytest.raises(AttributeError, match="for language models"):
            getattr(cache, name)
    with pytest.raises(AttributeError, match="HookedCLIP.to_tokens is a TransformerLens helper"):
        model.to_tokens("a dog")
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        cache.nonsense
    with pytest.raises(ValueError, match="pos_slice indexes a language model"):
        model.run_with_cache(image=torch.zeros(1, 3, model.image_size, model.image_size), pos_slice=0)
