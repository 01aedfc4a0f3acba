"""Pooled image-tower activations through HookedCLIP's cache, stored on disk and reused across analyses.

One forward pass per batch caches every requested point (names_filter) and stops at the last one
(stop_at), so nothing past the deepest needed layer is computed. Each (model weights, dataset content,
sample indices, point, pooling, transform) is one TensorCache entry: CKA, embeddings, SAE and sharing
all read the same files instead of re-encoding the images (docs/methods.md#paper-code-quirks).

At dataset scale `write_shards` streams instead: a DataLoader (workers, batches) feeds the model and
every point's pooled rows go to on-disk shards (clipmech.analysis.sae.ShardWriter) in a folder named
by the content hash of its inputs. Memory is one batch plus one shard buffer per point, whatever the
number of images; `ShardSet` reads them back in aligned batches and `cell_means` reduces them to
(domain, class) centroids, all CKA's centroid mode needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clipmech.analysis.sae import ActivationShards, ShardWriter
from clipmech.errors import UserError
from clipmech.utils import (PathLike, TensorCache, atomic_write_json, check_checkpoint_file, hash_obj, read_json,
                            unknown_name_error)

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


def inner_points(points: Sequence[str]) -> list[str]:
    """`points` (e.g. `model.analysis_points()` or a circuit's) without the input: the pixels are
    the same for every model, so CKA, node similarity and faithfulness skip them
    (docs/methods.md#analysis-points)."""
    return [p for p in points if not p.endswith("hook_input")]


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


class EvalPreprocess:
    """PIL image -> float32 [3, S, S]: resize (short side, bicubic, antialias) + centre crop + OpenAI
    normalisation; the same pixels as clipmech.eval.zeroshot.eval_images, as a picklable DataLoader
    transform so workers can decode and preprocess in parallel."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, img) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        from clipmech.data.preprocess import normalize
        x = TF.resize(TF.pil_to_tensor(img.convert("RGB")), self.image_size, InterpolationMode.BICUBIC, antialias=True)
        return normalize(TF.center_crop(x, [self.image_size, self.image_size]))

    def describe(self) -> str:
        return f"resize{self.image_size}-bicubic-centercrop{self.image_size}-openai-mean-std"


def image_batches(dataset, indices: np.ndarray, image_size: int, batch_size: int = 128, num_workers: int = 0
                  ) -> Iterator[torch.Tensor]:
    """Preprocessed float32 [<=batch_size, 3, S, S] batches of dataset rows `indices`, in order,
    decoded by `num_workers` DataLoader workers. Memory: a few batches."""
    loader = torch.utils.data.DataLoader(dataset.torch_dataset(EvalPreprocess(image_size), indices=indices),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, *_ in loader:
        yield images


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ShardSet:
    """A folder written by `write_shards`: per point an ActivationShards of the same rows, plus
    `indices.npy` (the dataset rows, in order) and `meta.json`."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        if not (self.folder / "done").is_file():
            raise FileNotFoundError(f"no finished activation shards at {self.folder}; extract them first")
        meta = json.loads((self.folder / "meta.json").read_text())
        self.points: list[str] = meta["points"]
        self.indices = np.load(self.folder / "indices.npy")

    def __len__(self) -> int:
        return len(self.indices)

    def shards(self, point: str) -> ActivationShards:
        """The point's rows as an ActivationShards (what train_sae / evaluate_sae stream)."""
        if point not in self.points:
            raise unknown_name_error("point in this shard set", point, self.points)
        return ActivationShards(self.folder / point)

    def iter_batches(self, points: Sequence[str], batch_size: int = 4096
                     ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """(dataset rows [b], {point: float32 [b, d]}) in stored order; memory = one shard per point."""
        its = [self.shards(p).iter_batches(batch_size, shuffle=False) for p in points]
        start = 0
        for xs in zip(*its):
            yield self.indices[start:start + len(xs[0])], dict(zip(points, xs))
            start += len(xs[0])


@torch.no_grad()
def write_shards(model, dataset, indices: np.ndarray, points: Sequence[str], root: PathLike, model_key: str,
                 pooling: str = "mean", batch_size: int = 128, num_workers: int = 0, device: str = "cpu",
                 precision: str = "fp32", shard_rows: int = 4096) -> ShardSet:
    """Pooled activations of dataset rows `indices` at `points`, streamed to ROOT/<content hash>/.

    The folder name hashes model_key (e.g. the checkpoint's file hash), the dataset's content hash,
    the indices, points, pooling, preprocessing and precision; an existing finished folder is reused
    as is. Written under a temporary name and renamed when complete, so a killed extraction leaves
    nothing that looks finished. precision "bf16"/"fp16" runs the forward pass under autocast
    (stored rows are float32). Cost: one image-tower pass up to the deepest point; memory: one
    batch + `shard_rows` rows per point.
    """
    order = image_points(model)
    for p in points:
        if p not in order:
            raise unknown_name_error("image hook point", p, order)
    if precision not in _PRECISIONS:
        raise unknown_name_error("extraction precision", precision, _PRECISIONS)
    idx = np.asarray(indices, dtype=np.int64)
    prep = EvalPreprocess(model.image_size)
    key = {"kind": "activation_shards", "model": model_key, "dataset": dataset.content_hash(),
           "indices": hash_obj(idx.tolist()), "points": list(points), "pooling": pooling,
           "transform": prep.describe(), "precision": precision}
    folder = Path(root) / hash_obj(key)
    if (folder / "done").is_file():
        problem = shard_set_problem(folder, list(points), len(idx))
        if problem is None:
            return ShardSet(folder)
        warnings.warn(f"activation shards {folder} are damaged ({problem}); extracting them again",
                      RuntimeWarning, stacklevel=2)
        shutil.rmtree(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {p: ShardWriter(tmp / p, shard_size=shard_rows) for p in points}
    was_training = model.training
    model.eval().to(device)
    dev_type = torch.device(device).type
    try:
        for images in image_batches(dataset, idx, model.image_size, batch_size, num_workers):
            with torch.autocast(dev_type, dtype=_PRECISIONS[precision], enabled=precision != "fp32"):
                _, acts = model.run_with_cache(image=images.to(device), names_filter=list(points),
                                               stop_at=max(points, key=order.index))
            for p in points:
                writers[p].add(pool(acts[p], pooling).float())
        for w in writers.values():
            w.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    np.save(tmp / "indices.npy", idx)
    atomic_write_json({"key": key, "points": list(points), "rows": int(len(idx))}, tmp / "meta.json")
    (tmp / "done").write_text("done\n")
    if folder.exists():  # another process finished the same content first; keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return ShardSet(folder)


def shard_set_problem(folder: PathLike, points: Sequence[str], rows: int) -> str | None:
    """What is wrong with a finished shard folder (a file missing, truncated or unparsable, a row count
    that is not `rows`), None when it is whole. Checks metadata and each shard file's bytes (its zip
    index), not the tensors: milliseconds per shard."""
    folder = Path(folder)
    try:
        if int(read_json(folder / "meta.json", "")["rows"]) != rows or len(np.load(folder / "indices.npy")) != rows:
            return f"it does not hold {rows} rows"
        for p in points:
            info = read_json(folder / p / "meta.json", "")
            if sum(int(sh["rows"]) for sh in info["shards"]) != rows:
                return f"{p} does not hold {rows} rows"
            for sh in info["shards"]:
                check_checkpoint_file(folder / p / sh["file"])
    except (UserError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        return str(err).split("; ")[0]
    return None


def cell_means(shards: ShardSet, points: Sequence[str], class_idx: np.ndarray, domain_idx: np.ndarray,
               n_domains: int, n_classes: int, batch_size: int = 4096) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Streamed (domain, class) centroids: ({point: float64 [cells, d]}, cells [cells, 2] as (domain,
    class)) over the cells present in the shards. class_idx / domain_idx are indexed by dataset row.
    Feeding these rows to clipmech.analysis.cka.domain_cka (mode "centroid") gives the same result
    as the full activations, since a cell's centroid of one row is that row. Memory: the sums."""
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(n_domains * n_classes, dtype=torch.float64)
    for rows, xs in shards.iter_batches(points, batch_size):
        cell = torch.from_numpy(domain_idx[rows] * n_classes + class_idx[rows])
        for p, x in xs.items():
            if p not in sums:
                sums[p] = torch.zeros(n_domains * n_classes, x.shape[1], dtype=torch.float64)
            sums[p].index_add_(0, cell, x.double())
        counts += torch.bincount(cell, minlength=n_domains * n_classes).double()
    present = torch.nonzero(counts > 0).flatten()
    cells = np.stack([present.numpy() // n_classes, present.numpy() % n_classes], axis=1)
    return {p: s[present] / counts[present, None] for p, s in sums.items()}, cells
