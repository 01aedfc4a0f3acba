"""Patching, attribution patching and IG: hand computations, captum parity, invariants, errors."""
import pytest
import torch
import torch.nn.functional as F

from clipmech.analysis import patching as P
from clipmech.models import HookedCLIP

LAYER = "visual.layer2.0.hook_out"


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return HookedCLIP.from_config("tiny-rn").double()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.double)
    other = torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.double)
    head = F.normalize(torch.randn(5, 64, generator=gen, dtype=torch.double), dim=-1)
    return images, other, head, torch.tensor([0, 1, 2, 3])


def _metric_with_patch(model, images, metric, point, fn):
    emb = []
    model.run_with_hooks(image=images, fwd_hooks=[(point, fn), ("hook_image_embed", lambda t, hook: emb.append(t))])
    return float(metric(emb[-1]).detach())


def test_metrics_match_hand_computation():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 8, generator=gen, dtype=torch.double)
    head = torch.randn(4, 8, generator=gen, dtype=torch.double)
    labels = torch.tensor([2, 0, 3])
    cos = torch.stack([torch.stack([F.cosine_similarity(e, h, dim=0) for h in head]) for e in emb])
    assert float(P.true_class_logit(head, labels)(emb)) == pytest.approx(float(cos[[0, 1, 2], labels].mean()))
    assert float(P.true_class_logit(head, labels, "sum")(emb)) == pytest.approx(float(cos[[0, 1, 2], labels].sum()))
    diff = cos[[0, 1, 2], labels] - cos[:, 1]
    assert float(P.logit_difference(head, labels, 1)(emb)) == pytest.approx(float(diff.mean()))
    probs = (10 * cos).softmax(-1)[[0, 1, 2], labels]
    assert float(P.correct_class_probability(head, labels, 10.0)(emb)) == pytest.approx(float(probs.mean()))
    text = torch.randn(3, 8, generator=gen, dtype=torch.double)
    sims = F.cosine_similarity(emb, text, dim=1)
    assert float(P.image_text_similarity(text)(emb)) == pytest.approx(float(sims.mean()))
    logits = 5 * F.normalize(emb, dim=1) @ F.normalize(text, dim=1).T
    ce = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert float(P.contrastive_loss(text, 5.0)(emb)) == pytest.approx(float(ce))


@pytest.mark.parametrize("granularity,units", [("channel", [0, 7, 100]), ("position", [0, 5, 63]), ("point", [0])])
def test_activation_patch_matches_hand_patching(rn, batch, granularity, units):
    images, other, head, labels = batch
    metric = P.true_class_logit(head, labels)
    got = P.activation_patch(rn, images, metric, LAYER, granularity=granularity, ablation="resample", source=other,
                             units=units, batch_units=2)
    src = P.cache_points(rn, other, [LAYER])[LAYER]
    clean = _metric_with_patch(rn, images, metric, LAYER, lambda t, hook: None)
    for u, effect in zip(units, got):
        def patch(t, hook, u=u):
            t = t.clone()
            if granularity == "channel":
                t[:, u] = src[:, u]
            elif granularity == "position":
                t[:, :, u // 8, u % 8] = src[:, :, u // 8, u % 8]
            else:
                t = src
            return t
        expected = _metric_with_patch(rn, images, metric, LAYER, patch) - clean
        assert float(effect) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_zero_and_mean_ablation_of_heads(batch):
    torch.manual_seed(0)
    vit = HookedCLIP.from_config("tiny-vit").double()
    images, other, head, labels = batch
    point = "visual.blocks.1.attn.hook_z"
    metric = P.true_class_logit(head, labels)
    zero = P.activation_patch(vit, images, metric, point, granularity="head", ablation="zero")
    mean = P.activation_patch(vit, images, metric, point, granularity="head", ablation="mean", reference=other)
    ref = P.cache_points(vit, other, [point])[point].mean(0)
    clean = _metric_with_patch(vit, images, metric, point, lambda t, hook: None)
    for h in range(2):
        def z(t, hook, h=h):
            t = t.clone()
            t[:, :, h] = 0
            return t

        def m(t, hook, h=h):
            t = t.clone()
            t[:, :, h] = ref[:, h]
            return t
        assert float(zero[h]) == pytest.approx(_metric_with_patch(vit, images, metric, point, z) - clean, rel=1e-9)
        assert float(mean[h]) == pytest.approx(_metric_with_patch(vit, images, metric, point, m) - clean, rel=1e-9)
    with pytest.raises(ValueError, match="per-head point"):
        P.activation_patch(vit, images, metric, "visual.blocks.1.hook_resid_post", granularity="head")


def test_attribution_patching_is_exact_for_a_linear_metric(rn, batch):
    # A metric linear in the last point's value makes the first-order estimate exact there.
    images, other, head, labels = batch
    w = head[0]
    metric = lambda e: (e @ w).mean()  # noqa: E731
    last = rn.analysis_points()[-1]
    attr = P.attribution_patch(rn, other, images, metric, points=[last, LAYER])
    exact = P.activation_patch(rn, images, metric, last, granularity="channel", ablation="resample", source=other)
    torch.testing.assert_close(attr[last], exact, rtol=1e-8, atol=1e-12)
    assert attr[LAYER].shape == (128,)
    point = P.attribution_patch(rn, other, images, metric, points=[LAYER], granularity="point")[LAYER]
    assert float(point) == pytest.approx(float(attr[LAYER].sum()), rel=1e-9)


@pytest.mark.parametrize("rule,method", [("left", "riemann_left"), ("right", "riemann_right"),
                                         ("midpoint", "riemann_middle")])
def test_ig_matches_captum_layer_ig(rn, batch, rule, method):
    from captum.attr import LayerIntegratedGradients

    images, other, head, labels = batch
    metric = P.true_class_logit(head, labels, reduce="sum")
    ours = P.integrated_gradients(rn, images, metric, LAYER, ablation="resample", source=other, steps=6, rule=rule)

    def per_image(x):
        logits = P.cosine_logits(rn.encode_image(x), head)  # captum stacks the steps into the batch
        return logits.gather(1, labels.repeat(len(x) // len(labels))[:, None])[:, 0]
    # captum interpolates the HookPoint's output between its values for `baselines` and `images`.
    lig = LayerIntegratedGradients(per_image, rn.hook_dict[LAYER])
    theirs = lig.attribute(images, baselines=other, n_steps=6, method=method)
    torch.testing.assert_close(ours, P.node_sum(theirs, LAYER).sum(0), rtol=1e-7, atol=1e-10)


def test_ig_completeness_against_exact_patching(rn, batch):
    images, other, head, labels = batch
    metric = P.true_class_logit(head, labels)
    ig = P.integrated_gradients(rn, images, metric, LAYER, ablation="resample", source=other, steps=24,
                                rule="midpoint", granularity="point", internal_batch_size=12)
    exact = P.activation_patch(rn, images, metric, LAYER, granularity="point", ablation="resample", source=other)
    # IG from a0 to a sums to metric(a) - metric(a0) = -(effect of patching a0 in).
    assert float(ig) == pytest.approx(-float(exact), rel=1e-2)  # midpoint rule: O(1/steps^2) error


def test_bad_inputs_raise_clear_errors(rn, batch):
    images, other, head, labels = batch
    with pytest.raises(ValueError, match="must return a scalar"):
        P.activation_patch(rn, images, lambda e: e.sum(-1), LAYER)
    with pytest.raises(ValueError, match="same shape"):
        P.attribution_patch(rn, images, other[:2], P.true_class_logit(head, labels))
    with pytest.raises(KeyError, match="layer2.0.hook_out"):
        P.integrated_gradients(rn, images, P.true_class_logit(head, labels), "visual.layer2.0.hook_outt")
    with pytest.raises(ValueError, match="rule must be"):
        P.riemann_alphas(4, "trapezoid")
    with pytest.raises(ValueError, match="units"):
        P.activation_patch(rn, images, P.true_class_logit(head, labels), LAYER, units=[500])
    with pytest.raises(ValueError, match="labels shape"):
        P.true_class_logit(head, labels[:2])(torch.randn(4, 64, dtype=torch.double))
