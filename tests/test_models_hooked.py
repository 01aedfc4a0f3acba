"""HookedCLIP on the tiny presets: parity with open_clip, hooks, caching, stop_at, forward_from."""
import pytest
import torch
import torch.nn.functional as F

from clipmech import HookedCLIP
from clipmech.models import create_open_clip

TINY = ["tiny-rn", "tiny-vit"]


def randomize_norms(model: torch.nn.Module, gain: float = 1.0) -> None:
    """Random BatchNorm statistics and affine weights, so no branch is trivially zero (open_clip
    zero-inits bn3) and eval-mode BN is not the identity. `gain` scales the affine weights (deep
    nets need < 1 to keep random activations in a sane range)."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
            mod.weight.data.copy_(gain * (0.5 + 0.5 * torch.rand(n, generator=g)))
            mod.bias.data.copy_(0.1 * torch.randn(n, generator=g))


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    torch.manual_seed(0)
    model = HookedCLIP.from_config(request.param)
    randomize_norms(model)
    return model


@pytest.fixture(scope="module")
def batch(tiny):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=g)
    text = tiny.tokenize(["a photo of a dog", "a sketch of a red bicycle"])
    return images, text


def test_state_dict_keys_and_parity_with_open_clip(tiny, batch):
    images, text = batch
    clip = tiny.to_open_clip()
    assert list(clip.state_dict()) == list(tiny.state_dict())
    with torch.no_grad():
        for normalize in (False, True):
            assert (tiny.encode_image(images, normalize) - clip.encode_image(images, normalize)).abs().max() < 1e-5
            assert (tiny.encode_text(text, normalize) - clip.encode_text(text, normalize)).abs().max() < 1e-5
        ours, theirs = tiny(image=images, text=text), clip(images, text)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)


def test_from_open_clip_shares_parameters(tiny):
    clip = tiny.to_open_clip()
    wrapped = HookedCLIP.from_open_clip(clip)
    assert wrapped.visual is clip.visual and wrapped.logit_scale is clip.logit_scale
    # the reconstructed config rebuilds the same architecture
    rebuilt = wrapped.to_open_clip()
    for (k, a), (k2, b) in zip(clip.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_quick_gelu_config_is_respected():
    from clipmech.models.configs import PRESETS
    cfg = dict(PRESETS["tiny-vit"], quick_gelu=True)
    model = HookedCLIP.from_config(cfg)
    from open_clip.transformer import QuickGELU
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model.encode_image(images) - model.to_open_clip().encode_image(images)).abs().max() < 1e-5


def test_run_with_cache_one_tower_only(tiny, batch):
    images, text = batch
    (img, txt, scale), cache = tiny.run_with_cache(image=images)
    assert txt is None and img.shape == (2, tiny.cfg["embed_dim"])
    assert set(cache) == set(tiny.hook_names("visual")) | {"hook_image_embed", "hook_image_embed_normalized"}
    (img, txt, _), cache = tiny.run_with_cache(text=text, names_filter=lambda n: n.startswith("text."))
    assert img is None and set(cache) == set(tiny.hook_names("text"))
    assert torch.allclose(cache["text.hook_proj"], tiny.encode_text(text), atol=1e-6)
    assert torch.allclose(F.normalize(cache["text.hook_proj"], dim=-1), txt, atol=1e-6)


def test_layouts_and_analysis_points(tiny, batch):
    images, text = batch
    _, cache = tiny.run_with_cache(image=images, text=text)
    points = tiny.analysis_points()
    assert points[-1] in ("visual.attnpool.hook_out", "visual.hook_pooled")
    if tiny.model_name == "tiny-rn":
        # input, 3 stem acts, avgpool, one bottleneck per stage, attnpool
        assert len(points) == 10 and points[:5] == ["visual.hook_input", "visual.hook_act1", "visual.hook_act2",
                                                    "visual.hook_act3", "visual.hook_avgpool"]
        assert cache["visual.layer1.0.hook_out"].shape == (2, 64, 16, 16)
        assert cache["visual.attnpool.hook_pattern"].shape == (2, 16, 1, 5)
    else:
        assert points == ["visual.hook_embed", "visual.blocks.0.hook_resid_post",
                          "visual.blocks.1.hook_resid_post", "visual.hook_pooled"]
        assert cache["visual.blocks.0.attn.hook_q"].shape == (2, 65, 2, 32)
        assert cache["visual.blocks.0.attn.hook_pattern"].shape == (2, 2, 65, 65)
    # text pattern is causal and rows are distributions
    pat = tiny.run_with_cache(text=text, names_filter="text.blocks.1.attn.hook_pattern")[1][
        "text.blocks.1.attn.hook_pattern"]
    assert torch.allclose(pat.sum(-1), torch.ones(()), atol=1e-5)
    assert pat.triu(diagonal=1).abs().max() == 0


def test_hooked_pattern_path_matches_fast_path(tiny, batch):
    images, text = batch
    fast = tiny(image=images, text=text)
    slow = tiny.run_with_hooks(image=images, text=text,
                               fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)])
    assert torch.allclose(fast[0], slow[0], atol=1e-6) and torch.allclose(fast[1], slow[1], atol=1e-6)


def test_per_head_z_times_out_proj_is_attention_output(tiny, batch):
    images, text = batch
    _, cache = tiny.run_with_cache(image=images, text=text)
    blk = tiny.transformer.resblocks[0]
    z = cache["text.blocks.0.attn.hook_z"]
    assert torch.allclose(blk.attn.out_proj(z.flatten(2)), cache["text.blocks.0.hook_attn_out"], atol=1e-5)
    # attention output as open_clip's fused nn.MultiheadAttention computes it
    ln = cache["text.blocks.0.ln1.hook_normalized"]
    ref = blk.attn(ln, ln, ln, need_weights=False, attn_mask=tiny.attn_mask)[0]
    assert torch.allclose(ref, cache["text.blocks.0.hook_attn_out"], atol=1e-5)
    if tiny.model_name == "tiny-rn":
        pool = tiny.visual.attnpool
        out = pool.c_proj(cache["visual.attnpool.hook_z"].flatten(1))
        assert torch.allclose(out, cache["visual.attnpool.hook_out"], atol=1e-5)
    else:
        vblk = tiny.visual.transformer.resblocks[1]
        out = vblk.attn.out_proj(cache["visual.blocks.1.attn.hook_z"].flatten(2))
        assert torch.allclose(out, cache["visual.blocks.1.hook_attn_out"], atol=1e-5)


def test_bottleneck_branch_plus_skip():
    model = HookedCLIP.from_config("tiny-rn")
    randomize_norms(model)
    _, cache = model.run_with_cache(image=torch.randn(2, 3, 64, 64))
    for li in range(1, 5):
        p = f"visual.layer{li}.0."
        assert torch.allclose(torch.relu(cache[p + "hook_branch"] + cache[p + "hook_skip"]), cache[p + "hook_out"])


def test_rewrites_per_head_channel_and_position(tiny, batch):
    images, _ = batch
    points = tiny.analysis_points()
    mid = points[len(points) // 2]
    _, cache = tiny.run_with_cache(image=images, names_filter=[mid])
    act = cache[mid]

    def edit(t):  # one channel (last dim for tokens, dim 1 for conv maps) and one spatial position
        t = t.clone()
        if t.ndim == 4:
            t[:, 3] = 0.0
            t[:, :, 1, 2] = 5.0
        else:
            t[..., 3] = 0.0
            t[:, 1] = 5.0
        return t

    rewritten = tiny.run_with_hooks(image=images, fwd_hooks=[(mid, lambda t, hook: edit(t))])[0]
    expected = F.normalize(tiny.forward_from(mid, edit(act)), dim=-1)
    assert torch.allclose(rewritten, expected, atol=1e-5)
    assert not torch.allclose(rewritten, tiny(image=images)[0], atol=1e-4)

    # per head: zero head 0 of the first attention (image tower) and recompute by hand from z
    zname = "visual.attnpool.hook_z" if tiny.model_name == "tiny-rn" else "visual.blocks.1.attn.hook_z"

    def kill_head(t, hook):
        t = t.clone()
        t[:, :, 0] = 0.0
        return t

    with tiny.hooks(fwd_hooks=[(zname, kill_head)]):
        _, cache = tiny.run_with_cache(image=images)
    z = cache[zname]
    assert z[:, :, 0].abs().max() == 0
    if tiny.model_name == "tiny-rn":
        assert torch.allclose(tiny.visual.attnpool.c_proj(z.flatten(1)), cache["visual.attnpool.hook_out"], atol=1e-5)
    else:
        vblk = tiny.visual.transformer.resblocks[1]
        assert torch.allclose(vblk.attn.out_proj(z.flatten(2)), cache["visual.blocks.1.hook_attn_out"], atol=1e-5)
    assert tiny.list_hooks() == {}


def test_stop_at(tiny, batch):
    images, text = batch
    point = tiny.analysis_points()[2]
    value, cache = tiny.run_with_cache(image=images, text=text, stop_at=point)
    assert torch.equal(value, cache[point])
    later = tiny.hook_names()[tiny.hook_names().index(point) + 1:]
    assert not any(n in cache for n in later), "nothing after the stop point runs"
    value = tiny(text=text, stop_at="text.blocks.0.hook_resid_mid")
    assert value.shape == (2, tiny.context_length, 64)
    with pytest.raises(ValueError, match="not reached"):
        tiny(text=text, stop_at=point)
    assert tiny.list_hooks() == {}


def test_forward_from(tiny, batch):
    images, _ = batch
    _, cache = tiny.run_with_cache(image=images)
    points = tiny.analysis_points()
    embed = cache["hook_image_embed"]
    for p in points:
        assert torch.allclose(tiny.forward_from(p, cache[p]), embed, atol=1e-5), p
    assert torch.allclose(tiny.forward_from(points[1], cache[points[1]], stop_at=points[3]), cache[points[3]], atol=1e-5)
    with pytest.raises(ValueError, match="does not come after"):
        tiny.forward_from(points[3], cache[points[3]], stop_at=points[1])

    # gradient w.r.t. the activation equals the gradient of the full forward at that point
    u = points[2]
    act = cache[u].clone().requires_grad_(True)
    tiny.forward_from(u, act).square().sum().backward()
    leaf = cache[u].clone().requires_grad_(True)
    with tiny.hooks(fwd_hooks=[(u, lambda t, hook: leaf)]):
        tiny.encode_image(images).square().sum().backward()
    assert torch.allclose(act.grad, leaf.grad, atol=1e-5, rtol=1e-4)


def test_tokenize_and_zero_shot_head(tiny):
    tokens = tiny.tokenize(["dog", "a very long caption " * 30])
    assert tokens.dtype == torch.long and tokens.shape == (2, tiny.context_length)
    assert tokens[1, -1] == tokens.max()  # truncated but keeps the end-of-text token (argmax pooling)
    classes, templates = ["dog", "cat", "boat"], ["a photo of a {}.", lambda c: f"a sketch of a {c}."]
    head = tiny.zero_shot_head(classes, templates)
    assert head.shape == (3, tiny.cfg["embed_dim"])
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        cat = F.normalize(tiny.encode_text(tiny.tokenize(["a photo of a cat.", "a sketch of a cat."]), normalize=True)
                          .mean(0), dim=-1)
    assert torch.allclose(head[1], cat, atol=1e-5)


RN50_POINTS = (["visual.hook_input", "visual.hook_act1", "visual.hook_act2", "visual.hook_act3", "visual.hook_avgpool"]
               + [f"visual.layer{li}.{i}.hook_out" for li, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(n)]
               + ["visual.attnpool.hook_out"])


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_full_size_parity_and_checkpoint_round_trip(name, tmp_path):
    """Real architectures at batch 1: open_clip parity, also after an open_clip_train checkpoint."""
    torch.manual_seed(0)
    clip = create_open_clip(name)
    randomize_norms(clip, gain=0.3)
    model = HookedCLIP.from_open_clip(clip, model_name=name)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}},
               path)
    loaded = HookedCLIP.from_checkpoint(path, model_name=name)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    text = model.tokenize(["a photo of a dog"])
    with torch.no_grad():
        ref_img, ref_txt = clip.encode_image(images), clip.encode_text(text)
        assert ref_img.abs().max() > 1e-2  # the comparison is not between near-zero vectors
        _, cache = model.run_with_cache(image=images, names_filter=lambda n: "attn" in n or n == "hook_image_embed")
        assert (cache["hook_image_embed"] - ref_img).abs().max() < 1e-5
        assert (model.encode_text(text) - ref_txt).abs().max() < 1e-5
        assert (loaded.encode_image(images) - ref_img).abs().max() < 1e-5
        assert (loaded.encode_text(text) - ref_txt).abs().max() < 1e-5
    if name == "RN50":
        assert model.analysis_points() == RN50_POINTS and len(RN50_POINTS) == 22
        z = cache["visual.attnpool.hook_z"]
        assert z.shape == (1, 1, 32, 64)
        assert torch.allclose(clip.visual.attnpool.c_proj(z.flatten(1)), cache["visual.attnpool.hook_out"], atol=1e-5)
        assert torch.allclose(cache["visual.attnpool.hook_out"], ref_img, atol=1e-5)
    else:
        assert len(model.analysis_points()) == 14
        z = cache["visual.blocks.11.attn.hook_z"]
        assert z.shape == (1, 50, 12, 64)
        out_proj = clip.visual.transformer.resblocks[11].attn.out_proj
        assert torch.allclose(out_proj(z.flatten(2)), cache["visual.blocks.11.hook_attn_out"], atol=1e-5)


def test_hook_names_are_in_firing_order(tiny, batch):
    fired = []
    tiny.run_with_hooks(image=batch[0], text=batch[1], fwd_hooks=[(lambda n: True, lambda t, hook: fired.append(hook.name))])
    assert fired == tiny.hook_names()
    assert tiny.hook_names("visual") + tiny.hook_names("text") == [n for n in fired if "." in n]


def test_backward_hooks_and_forward_from_leave_input_untouched(tiny, batch):
    images = batch[0]
    point = tiny.analysis_points()[-2]
    grads = {}
    out = tiny.run_with_hooks(image=images, bwd_hooks=[(point, lambda g, hook: grads.setdefault(hook.name, g))],
                              reset_hooks_end=False)
    out[0][:, 0].sum().backward()
    tiny.reset_hooks()
    act = tiny.run_with_cache(image=images, names_filter=point)[1][point]
    before = act.clone()
    act.requires_grad_(True)
    F.normalize(tiny.forward_from(point, act), dim=-1)[:, 0].sum().backward()
    assert torch.allclose(grads[point], act.grad, atol=1e-6)
    assert torch.equal(act.detach(), before)


@pytest.mark.parametrize("vision,text", [
    ({"ls_init_value": 0.1, "pool_type": "avg"}, {"ls_init_value": 0.1, "proj_bias": True, "proj_type": "linear"}),
    ({"no_ln_pre": True, "final_ln_after_pool": True}, {"no_causal_mask": True, "pool_type": "last"}),
])
def test_open_clip_config_variants(vision, text):
    from clipmech.models.configs import PRESETS
    base = PRESETS["tiny-vit"]
    cfg = {**base, "vision_cfg": {**base["vision_cfg"], **vision}, "text_cfg": {**base["text_cfg"], **text}}
    clip = create_open_clip(cfg)
    model = HookedCLIP.from_open_clip(clip)  # config reconstructed from the modules
    rebuilt = model.to_open_clip()
    images, tokens = torch.randn(2, 3, 64, 64), model.tokenize(["a dog", "two red cats"])
    with torch.no_grad():
        for ref in (clip, rebuilt):
            assert (model.encode_image(images) - ref.encode_image(images)).abs().max() < 1e-5
            assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() < 1e-5


def test_deepcopy_is_independent(tiny, batch):
    import copy
    twin = copy.deepcopy(tiny)
    assert twin.hook_dict["visual.hook_input"] is not tiny.hook_dict["visual.hook_input"]
    with torch.no_grad():  # the copy's forward uses the copy's own modules
        for p in twin.visual.parameters():
            p.zero_()
        assert twin.encode_image(batch[0]).abs().max() == 0 and tiny.encode_image(batch[0]).abs().max() > 0
    with twin.hooks(fwd_hooks=[("hook_text_embed", lambda t, hook: t * 0)]):
        assert tiny.list_hooks() == {} and tiny.encode_text(batch[1]).abs().max() > 0


def test_image_transform_feeds_encode_image(tiny):
    from PIL import Image
    x = tiny.image_transform()(Image.new("RGB", (100, 80), (200, 30, 30)))
    assert x.shape == (3, tiny.image_size, tiny.image_size)
    assert tiny.encode_image(x[None]).shape == (1, tiny.cfg["embed_dim"])
