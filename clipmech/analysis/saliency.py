"""Spatial attributions: where in the image a class, a node, a node set or a circuit finds its evidence.

Three maps, each for ResNet feature maps [B, C, H, W] and ViT token streams [B, T, D] alike:

- `node_saliency`: integrated gradients (IG) of a metric with respect to the activation at one or
  more hook points, summed over a node set (a circuit's nodes, one channel, one head) and kept per
  position; ResNet positions are the feature-map cells, ViT positions the patch tokens (the class
  token is dropped). Per image the positions of the full node axis sum to metric(a) - metric(a0).
- `input_saliency`: IG at the pixels (`visual.hook_input`), summed over colour channels, from a
  stated baseline: 'zero' is the all-zero normalised image, i.e. the dataset mean colour.
- `grad_cam`: Selvaraju et al.'s Grad-CAM at a spatial point (default: the last one, `last_spatial_point`):
  ReLU(sum_c mean_positions(dmetric/da_c) * a_c) per position.

`upsample` brings any of them to the image grid. The metric is a `patching.Metric`; for per-image maps
it must SUM over the batch (e.g. `true_class_logit(head, labels, reduce="sum")`), so that image b's
gradient depends on image b only. The one place this module calls the IG engine is `_path_gradient`.

captum's `LayerIntegratedGradients` / `LayerGradCam` compute the same maps but rerun the whole model
per step; here only the segment from the hook point to the embedding runs
(benchmarks/saliency_captum.py states the difference and the speed ratio).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipmech.analysis.patching import (Metric, cache_points, check_points, evaluate_metric,
                                        mean_gradient_along_path, node_dim, riemann_alphas, segment_fn)
from clipmech.data.preprocess import black_image

# Riemann midpoint steps. Input-IG completeness error on random tiny models (8 images, float64): tiny-vit
# max 77 % at 4 steps, 15 % at 8, 3.5 % at 16, 0.9 % at 32; tiny-rn < 1e-5 from 4 steps on.
IG_STEPS = 16


def _path_gradient(model, images: Tensor, metric: Metric, point: str, baseline: Tensor, alphas: Sequence[float],
                   internal_batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(activation a at `point`, mean over `alphas` of dmetric/da at a0 + alpha (a - a0)); only the
    segment point -> embedding runs, all path points in one batch unless `internal_batch_size`.
    A hook point without positions is refused (checked on a, before any gradient)."""
    if point == "visual.hook_input":  # the pixels: the whole tower, no hook needed (a ViT has no analysis point there)
        a, run = images, model.encode_image
    else:
        a, run = cache_points(model, images, [point])[point], segment_fn(model, point, images)
        if grid_of(a.shape, point) is None:
            grid_shape(model, point)  # raises, naming spatial points
    n = len(images)

    def summed(path: Tensor) -> Tensor:
        return sum(evaluate_metric(metric, e) for e in run(path).unflatten(0, (-1, n)))

    a0 = baseline.to(a).expand_as(a)
    return a, mean_gradient_along_path(summed, a, a0, list(alphas), internal_batch_size)


def grid_shape(model, point: str) -> tuple[int, int]:
    """(h, w) of the spatial positions at `point`; raises ValueError naming spatial points when the
    point has none (a pooled vector, the attention-pool query, an embedding)."""
    check_points(model, [point])
    probe = torch.zeros(1, 3, model.image_size, model.image_size, dtype=next(model.parameters()).dtype,
                        device=next(model.parameters()).device)
    shape = cache_points(model, probe, [point])[point].shape
    grid = grid_of(shape, point)
    if grid is None:
        spatial = ", ".join(spatial_points(model)[-3:])
        raise ValueError(f"hook point {point!r} (shape {list(shape)}) has no spatial positions; choose a spatial "
                         f"point, e.g. {spatial}")
    return grid


def grid_of(shape: Sequence[int], point: str) -> tuple[int, int] | None:
    """(h, w) for an activation shape, None without a grid of at least two positions (a 1x1 map,
    e.g. tiny-rn's layer4 at 32 px, cannot say where anything is)."""
    d = node_dim(point, len(shape))
    if len(shape) == 4 and d == 1:
        return (int(shape[2]), int(shape[3])) if shape[2] * shape[3] > 1 else None
    if len(shape) in (3, 4) and d != 1:
        tokens = int(shape[1])
        for n in (tokens - 1, tokens):  # with or without a leading class / mean token
            side = math.isqrt(max(n, 0))
            if n > 1 and side * side == n:
                return side, side
    return None


def spatial_points(model) -> list[str]:
    """Analysis points with spatial positions, in forward order (pixels excluded)."""
    probe = torch.zeros(1, 3, model.image_size, model.image_size, dtype=next(model.parameters()).dtype,
                        device=next(model.parameters()).device)
    points = [p for p in model.analysis_points() if p != "visual.hook_input"]
    acts = cache_points(model, probe, points)
    return [p for p in points if grid_of(acts[p].shape, p) is not None]


def last_spatial_point(model) -> str:
    """The last analysis point with positions: ResNet layer4's output, a ViT's last block."""
    return spatial_points(model)[-1]


def position_map(values: Tensor, point: str, nodes: Sequence[int] | None = None) -> Tensor:
    """[B, h, w]: an elementwise map at `point` (attribution or activation, [B, C, H, W] or tokens
    [B, T, D] / [B, T, H, d]) summed over the `nodes` of its node axis (default all) and over
    anything else that is not a position; a leading class / mean token is dropped."""
    grid = grid_of(values.shape, point)
    if grid is None:
        raise ValueError(f"{point!r} of shape {list(values.shape)} has no spatial positions")
    d = node_dim(point, values.ndim)
    if nodes is not None:
        idx = torch.as_tensor(list(nodes), dtype=torch.long, device=values.device)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= values.shape[d]):
            raise ValueError(f"node indices {list(nodes)[:5]} out of range for {values.shape[d]} nodes of {point!r}")
        values = values.index_select(d, idx)
    if values.ndim == 4 and d == 1:
        return values.sum(1)
    per_token = values.flatten(2).sum(-1)  # [B, T]
    h, w = grid
    return per_token[:, -h * w:].reshape(len(values), h, w)


def upsample(maps: Tensor, size: int) -> Tensor:
    """[B, h, w] -> [B, size, size], bilinear, rescaled so each map keeps its sum (a map's mass is
    an attribution; upsampling must not create any)."""
    h, w = maps.shape[-2:]
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return up * (h * w / (size * size))


def node_saliency(model, images: Tensor, metric: Metric, nodes: Mapping[str, Sequence[int] | None], *,
                  steps: int = IG_STEPS, baseline: str | Tensor = "zero", reference: Tensor | None = None,
                  internal_batch_size: int | None = None) -> dict[str, Tensor]:
    """{point: [B, h, w]} IG attribution of `metric` to the `nodes` of each point (None = every node),
    per position. baseline 'zero' (activation 0), 'mean' (the mean activation over `reference`,
    default `images`) or an activation tensor (one point only; e.g. that of a baseline image, captum's
    layer-IG baseline). Per image and point, the map over all nodes sums to metric(a) - metric(a0) up
    to the Riemann error. Cost per point: `steps` forward+backward passes of the segment point ->
    embedding over the batch."""
    out = {}
    for point, idx in nodes.items():
        if isinstance(baseline, Tensor):
            a0 = baseline
        elif baseline == "zero":
            a0 = torch.zeros(())
        elif baseline == "mean":
            ref = images if reference is None else reference
            a0 = cache_points(model, ref, [point])[point].mean(0, keepdim=True)
        else:
            raise ValueError(f"baseline must be 'zero' or 'mean', got {baseline!r}")
        a, g = _path_gradient(model, images, metric, point, a0, riemann_alphas(steps, "midpoint"), internal_batch_size)
        out[point] = position_map(((a - a0.to(a)) * g).detach(), point, idx)
    return out


def circuit_saliency(model, images: Tensor, metric: Metric, nodes: Mapping[str, Sequence[int]], **kw) -> Tensor:
    """[B, S, S] one image-grid map for a node set spread over several points (a circuit's
    `nodes`): each point's `node_saliency` upsampled to the image and summed (mass kept), so
    every point's nodes count by the attribution they carry. Points without positions are skipped."""
    spatial = [p for p in nodes if grid_of(cache_points(model, images[:1], [p])[p].shape, p) is not None]
    if not spatial:
        raise ValueError(f"none of the points {list(nodes)} has spatial positions")
    maps = node_saliency(model, images, metric, {p: nodes[p] for p in spatial}, **kw)
    return sum(upsample(m, model.image_size) for m in maps.values())


def input_saliency(model, images: Tensor, metric: Metric, *, steps: int = IG_STEPS, baseline: str | Tensor = "zero",
                   internal_batch_size: int | None = None) -> Tensor:
    """[B, S, S] input-level IG summed over colour channels. baseline 'zero' = the all-zero
    normalised image (the dataset mean colour), 'black' = pixel value 0 under OpenAI's
    normalisation, or a tensor [3, S, S] / [B, 3, S, S]. Cost: `steps` full image-tower passes."""
    if isinstance(baseline, Tensor):
        a0 = baseline
    elif baseline == "zero":
        a0 = torch.zeros(())
    elif baseline == "black":
        a0 = black_image()
    else:
        raise ValueError(f"baseline must be 'zero', 'black' or a tensor, got {baseline!r}")
    a, g = _path_gradient(model, images, metric, "visual.hook_input", a0, riemann_alphas(steps, "midpoint"),
                          internal_batch_size)
    return ((a - a0.to(a)) * g).sum(1).detach()


def grad_cam(model, images: Tensor, metric: Metric, point: str | None = None, relu: bool = True) -> Tensor:
    """[B, h, w] Grad-CAM at `point` (default `last_spatial_point`): per position
    sum over nodes of mean_positions(dmetric/da) * a, then ReLU (unless `relu=False`). ViT tokens use
    the patch tokens only, as positions and for the gradient mean. Cost: one forward+backward of the
    segment point -> embedding."""
    point = point or last_spatial_point(model)
    a, g = _path_gradient(model, images, metric, point, torch.zeros(()), [1.0])
    h, w = grid_of(a.shape, point)
    d = node_dim(point, a.ndim)
    if a.ndim == 4 and d == 1:
        weights = g.mean(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(1)
    else:  # tokens: [B, T, ...]; the patch tokens are the last h*w
        a, g = a[:, -h * w:], g[:, -h * w:]
        cam = (g.mean(1, keepdim=True) * a).flatten(2).sum(-1).reshape(len(a), h, w)
    return (cam.clamp_min(0) if relu else cam).detach()


# ------------------------------------------------------------------------------------ checks
def mass_fraction(maps: Tensor, mask: Tensor) -> Tensor:
    """[B]: share of each map's positive mass inside `mask` ([S, S] or [B, S, S] bool, the map's
    grid). A map without positive mass gives NaN-free 0."""
    pos = maps.clamp_min(0).flatten(1)
    inside = (maps.clamp_min(0) * mask.to(maps.device)).flatten(1).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def rank_similarity(a: Tensor, b: Tensor) -> np.ndarray:
    """[B] Spearman rank correlation of |a_i| and |b_i| per map (Adebayo et al.'s model-randomisation
    metric: near 1 when a map does not depend on the weights). Maps [B, ...]; a constant map gives 0."""
    from scipy.stats import spearmanr

    a, b = a.detach().abs().flatten(1).double().cpu().numpy(), b.detach().abs().flatten(1).double().cpu().numpy()
    out = []
    for x, y in zip(a, b):
        out.append(0.0 if np.ptp(x) == 0 or np.ptp(y) == 0 else float(spearmanr(x, y).statistic))
    return np.array(out)
