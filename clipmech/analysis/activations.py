"""Pooled image-tower activations through HookedCLIP's cache, stored on disk and reused across analyses.

One forward pass per batch caches every requested point (names_filter) and stops at the last one
(stop_at), so nothing past the deepest needed layer is computed. Each (model weights, dataset content,
sample indices, point, pooling, transform) is one TensorCache entry: CKA, embeddings, SAE and sharing
all read the same files instead of re-encoding the images (paper.md §12, "no caching between scripts").
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from clipmech.utils import PathLike, TensorCache, hash_obj, unknown_name_error

POOLINGS = ("mean", "cls", "none")


def pool(t: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce one point's activation to (B, d).

    "mean": spatial mean of conv maps [B,C,H,W] -> [B,C], token mean of sequences [B,T,D] -> [B,D];
    "cls": the first token of [B,T,D] (ViT class token); "none": flatten everything after the batch dim.
    Vectors [B,D] pass through unchanged for "mean" and "none".
    """
    if how not in POOLINGS:
        raise unknown_name_error("pooling", how, POOLINGS)
    if how == "none" or t.ndim == 2:
        if how == "cls":
            raise ValueError(f"pooling 'cls' needs a token sequence [B,T,D]; got shape {tuple(t.shape)}")
        return t.reshape(t.shape[0], -1)
    if how == "cls":
        if t.ndim != 3:
            raise ValueError(f"pooling 'cls' needs a token sequence [B,T,D]; got shape {tuple(t.shape)} "
                             "(conv maps: use 'mean')")
        return t[:, 0]
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    raise ValueError(f"cannot pool an activation of shape {tuple(t.shape)}")


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) of all parameter and buffer bytes: same weights -> same cache keys. O(#params)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def image_points(model) -> list[str]:
    """Hook points of the image pathway in forward order (visual.* and hook_image_embed*)."""
    return [n for n in model.hook_names() if n.startswith("visual.") or n.startswith("hook_image_embed")]


@torch.no_grad()
def extract_activations(model, dataset, points: Sequence[str], pooling: str | dict[str, str],
                        indices: np.ndarray | None = None, batch_size: int = 128,
                        cache_dir: PathLike | None = None, model_key: str | None = None,
                        device: str = "cpu", num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Pooled activations {point: float32 (N, d)} of `dataset` rows `indices` (default: all).

    model: HookedCLIP; points: image-pathway hook names; pooling: one of POOLINGS or {point: pooling}.
    With cache_dir, each point is loaded from / saved to a TensorCache keyed by model_key (default the
    weights' fingerprint), dataset.content_hash(), the indices, the point, its pooling and the
    transform; only missing points are computed, in one pass that stops at the deepest of them.
    Cost: one image-tower pass over N images up to the deepest missing point.
    """
    order = image_points(model)
    for p in points:
        if p not in order:
            raise unknown_name_error("image hook point", p, order)
    if not points:
        raise ValueError("extract_activations: no points requested; see model.analysis_points()")
    poolings = {p: pooling[p] if isinstance(pooling, dict) else pooling for p in points}
    for p, how in poolings.items():
        if how not in POOLINGS:
            raise unknown_name_error("pooling", how, POOLINGS)
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    transform_desc = f"open_clip.image_transform({model.image_size}, eval)"
    key_base = {"kind": "pooled_activations", "model": model_key or state_fingerprint(model),
                "dataset": dataset.content_hash(), "indices": hash_obj(idx.tolist()), "transform": transform_desc}
    keys = {p: {**key_base, "point": p, "pooling": poolings[p]} for p in points}
    cache = TensorCache(cache_dir) if cache_dir is not None else None
    out: dict[str, torch.Tensor] = {}
    missing = [p for p in points if cache is None or not cache.path(keys[p]).exists()]
    if missing:
        computed = _run(model, dataset, idx, missing, poolings, batch_size, device, num_workers, order)
    for p in points:
        if p in missing:
            out[p] = cache.get_or_compute(keys[p], lambda p=p: computed[p]) if cache else computed[p]
        else:
            out[p] = cache.get_or_compute(keys[p], lambda: _unreachable(p))
    return out


def _unreachable(point: str) -> Any:
    raise RuntimeError(f"activation cache entry for {point!r} vanished while reading; rerun")


def _run(model, dataset, idx: np.ndarray, points: list[str], poolings: dict[str, str], batch_size: int,
         device: str, num_workers: int, order: list[str]) -> dict[str, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset.torch_dataset(model.image_transform(), indices=idx),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers)
    last = max(points, key=order.index)
    was_training = model.training
    model.eval().to(device)
    parts: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    try:
        for images, *_ in loader:
            _, acts = model.run_with_cache(image=images.to(device), names_filter=list(points), stop_at=last)
            for p in points:
                parts[p].append(pool(acts[p], poolings[p]).float().cpu())
    finally:
        model.train(was_training)
    return {p: torch.cat(v) for p, v in parts.items()}
