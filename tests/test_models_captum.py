"""captum's LayerIntegratedGradients on a HookedCLIP HookPoint agrees with a hand-written Riemann IG."""
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients

from clipmech import HookedCLIP


@pytest.mark.parametrize("name,point", [("tiny-rn", "visual.layer2.0.hook_out"),
                                        ("tiny-vit", "visual.blocks.0.hook_resid_post")])
def test_layer_integrated_gradients_matches_riemann_sum(name, point):
    torch.manual_seed(0)
    model = HookedCLIP.from_config(name)
    head = model.zero_shot_head(["dog", "cat", "boat"], ["a photo of a {}."])
    images = torch.randn(2, 3, 64, 64)
    baseline = torch.zeros_like(images)
    target, steps = 1, 8

    def logits(x):
        return model.encode_image(x, normalize=True) @ head.T

    lig = LayerIntegratedGradients(logits, model.hook_dict[point])
    ours = lig.attribute(images, baselines=baseline, target=target, n_steps=steps, method="riemann_middle")
    assert model.list_hooks() == {} and not model.hook_dict[point]._forward_hooks  # captum cleaned up

    # Same path in layer space: a(baseline) + alpha (a(input) - a(baseline)), midpoint alphas.
    with torch.no_grad():
        a_in = model.run_with_cache(image=images, names_filter=point)[1][point]
        a_base = model.run_with_cache(image=baseline, names_filter=point)[1][point]
    grads = torch.zeros_like(a_in)
    for i in range(steps):
        alpha = (i + 0.5) / steps
        path = (a_base + alpha * (a_in - a_base)).requires_grad_(True)
        out = F.normalize(model.forward_from(point, path), dim=-1) @ head.T
        grads += torch.autograd.grad(out[:, target].sum(), path)[0] / steps
    hand = (a_in - a_base) * grads

    assert ours.shape == a_in.shape
    assert torch.allclose(ours, hand, atol=1e-6, rtol=1e-4)
    # completeness: attributions sum to the change in the target logit (up to the Riemann error)
    delta = logits(images)[:, target] - logits(baseline)[:, target]
    assert torch.allclose(hand.flatten(1).sum(1), delta.detach(), atol=0.05 * delta.abs().max().item() + 1e-4)
