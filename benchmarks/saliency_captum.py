"""clipmech.analysis.saliency vs captum on identical inputs: layer IG (LayerIntegratedGradients),
input IG (IntegratedGradients) and Grad-CAM (LayerGradCam), same baselines, Riemann midpoint rule
and step count (Grad-CAM on ResNet maps only: captum's LayerGradCam reads dim 1 as channels,
which ViT tokens are not). Prints, per method, the largest difference relative to the map's largest value and
the time ratio captum / clipmech (best of --repeats, measured side by side in one process).

    python benchmarks/saliency_captum.py                      # tiny-rn, 8 images, 16 steps
    python benchmarks/saliency_captum.py --model RN50 --images 4 --image-size 224

Why ours can be faster: captum's layer methods run the whole image tower per IG step and hook the
layer's output; ours caches the activation once and runs only the segment from the layer to the
embedding (`segment_fn`), all steps in one batch. Input IG and Grad-CAM at the last layer run about
the same graph in both.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerGradCam, LayerIntegratedGradients

from clipmech.analysis import patching as P
from clipmech.analysis import saliency as S
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-rn")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--point", default=None, help="layer-IG point (default: the second-to-last spatial point)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    _, cfg = resolve_config(args.model)
    if args.image_size:
        cfg["vision_cfg"]["image_size"] = args.image_size
    model = HookedCLIP.from_config(cfg).eval()
    size = model.image_size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
    head = F.normalize(torch.randn(5, model.cfg["embed_dim"], generator=torch.Generator().manual_seed(2)), dim=-1)
    labels = torch.arange(args.images) % 5
    metric = P.true_class_logit(head, labels, reduce="sum")
    zeros = torch.zeros_like(images)
    point = args.point or S.spatial_points(model)[-2]
    cam_point = S.last_spatial_point(model)

    def logits(x):
        return P.cosine_logits(model.encode_image(x), head)

    a0 = P.cache_points(model, zeros, [point])[point]
    rows = {
        f"layer IG at {point}": (
            lambda: S.node_saliency(model, images, metric, {point: None}, steps=args.steps, baseline=a0)[point],
            lambda: S.position_map(LayerIntegratedGradients(logits, model.hook_dict[point]).attribute(
                images, baselines=zeros, target=labels, n_steps=args.steps, method="riemann_middle"), point)),
        "input IG": (
            lambda: S.input_saliency(model, images, metric, steps=args.steps),
            lambda: IntegratedGradients(logits).attribute(images, baselines=zeros, target=labels, n_steps=args.steps,
                                                          method="riemann_middle").sum(1)),
    }
    if P.cache_points(model, images[:1], [cam_point])[cam_point].ndim == 4:  # captum's LayerGradCam reads
        # dim 1 as channels: comparable on conv maps only, not on ViT tokens [B, T, D]
        rows[f"Grad-CAM at {cam_point}"] = (
            lambda: S.grad_cam(model, images, metric, cam_point),
            lambda: LayerGradCam(logits, model.hook_dict[cam_point]).attribute(images, target=labels,
                                                                               relu_attributions=True)[:, 0])
    print(f"{args.model} at {size} px, {args.images} images, {args.steps} IG steps, {torch.get_num_threads()} "
          f"thread(s), best of {args.repeats}")
    print(f"{'method':<44} {'clipmech s':>10} {'captum s':>9} {'captum/ours':>11} {'max rel diff':>12}")
    for name, (ours_fn, theirs_fn) in rows.items():
        t_ours, ours = best_time(ours_fn, args.repeats)
        t_theirs, theirs = best_time(theirs_fn, args.repeats)
        diff = float((ours - theirs.detach()).abs().max() / theirs.detach().abs().max().clamp_min(1e-30))
        print(f"{name:<44} {t_ours:>10.3f} {t_theirs:>9.3f} {t_theirs / t_ours:>11.2f} {diff:>12.1e}")


if __name__ == "__main__":
    main()
