"""Zero-shot DG/CG evaluation: per domain x {C1, C2} accuracy of every checkpoint of a run.

Prediction = argmax cosine between the L2-normalised image embedding and the class embeddings of a
template ensemble (HookedCLIP.zero_shot_head), over all classes of the dataset (docs/methods.md#evaluation).
Image features and class heads are cached on disk (clipmech.utils.TensorCache) under a key holding
the checkpoint's content hash, the dataset's content hash, the evaluated indices and the transform,
so a re-evaluation is near-free and a changed checkpoint never hits a stale entry.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clipmech.data.dataset import UnreadableImageError, report_unreadable
from clipmech.eval.templates import get_templates
from clipmech.data.preprocess import eval_images, eval_transform_description
from clipmech.utils import TensorCache, atomic_write_json, file_hash, hash_obj

GROUPS = ("C1", "C2")
PRECISIONS = ("fp32", "fp16")


def precision_dtype(precision: str) -> torch.dtype:
    """torch dtype of an evaluation precision: "fp32", or "fp16" = the paper's half-precision model
    (weights and images cast to float16; on CPU fp16 kernels are slow and serve tests only)."""
    if precision not in PRECISIONS:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("evaluation precision", precision, PRECISIONS)
    return torch.float16 if precision == "fp16" else torch.float32


@torch.no_grad()
def encode_dataset(encode: Callable[[torch.Tensor], torch.Tensor], dataset, indices: np.ndarray, image_size: int,
                   batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """encode(images) for the dataset images at `indices`, batched; returns float32 [N, D] on CPU.
    Rows of unreadable images are NaN (the model never sees them). Images reach `encode` as float32;
    a half-precision model casts them itself (`clip_scores`, `evaluate_run`)."""
    feats = []
    for lo in range(0, len(indices), batch_size):
        batch = eval_images(dataset, indices[lo:lo + batch_size], image_size, skip_unreadable=True)
        ok = ~torch.isnan(batch).flatten(1).any(1)
        good = encode(batch[ok].to(device)).float().cpu() if ok.any() else None
        if good is None:
            raise UnreadableImageError(dataset.sources[int(indices[lo])] if dataset.sources else "?",
                                       f"none of {len(batch)} images in a row can be read")
        rows = torch.full((len(batch), good.shape[1]), float("nan"))
        rows[ok] = good
        feats.append(rows)
    return torch.cat(feats) if feats else torch.empty(0, 0)


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] of preprocessed `images` [N, 3, S, S], batched, no grad."""
    return torch.cat([model.encode_image(images[i:i + batch_size], normalize=True)
                      for i in range(0, len(images), batch_size)])


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], k: int = 5
                           ) -> dict[str, Any]:
    """Top-1 (sample-weighted and class-balanced), top-k, per-class accuracy, sparse confusion.

    scores [N, K] (any monotone score), labels int64 [N]. Balanced = mean accuracy over the classes
    present in `labels`. Confusion = [[true, predicted, count], ...] of nonzero cells.
    """
    if len(labels) == 0:
        raise ValueError("classification_metrics needs at least one sample")
    pred = scores.argmax(dim=1)
    topk = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hit1 = (pred == labels).float()
    hitk = (topk == labels[:, None]).any(dim=1).float()
    present = torch.unique(labels)
    per_class = {classes[int(c)]: hit1[labels == c].mean().item() for c in present}
    pairs, counts = torch.unique(torch.stack([labels, pred], dim=1), dim=0, return_counts=True)
    return {
        "top1": hit1.mean().item(),
        "top1_balanced": float(np.mean(list(per_class.values()))),
        f"top{k}": hitk.mean().item(),
        "n": len(labels),
        "per_class": per_class,
        "confusion": [[int(t), int(p), int(n)] for (t, p), n in zip(pairs.tolist(), counts.tolist())],
    }


def group_metrics(scores: torch.Tensor, dataset, indices: np.ndarray, c2_classes: Sequence[str]
                  ) -> tuple[dict[str, float], dict[str, Any]]:
    """(flat metrics {"{domain}/{C1|C2}/{top1|top1_balanced|top5}": float}, details per group).

    Groups without samples are listed in details["skipped"] rather than reported as 0 or NaN. Rows
    whose scores are not finite (unreadable images, see `encode_dataset`) are left out and their
    samples listed in details["unreadable"] (present only when there are any).
    """
    readable = torch.isfinite(scores).all(1).numpy()
    unreadable = np.asarray(indices)[~readable]
    scores, indices = scores[torch.from_numpy(readable)], np.asarray(indices)[readable]
    c2_idx = {dataset.class_index(c) for c in c2_classes}
    labels = torch.as_tensor(dataset.class_idx[indices])
    domains = dataset.domain_idx[indices]
    is_c2 = np.isin(dataset.class_idx[indices], list(c2_idx))
    flat: dict[str, float] = {}
    details: dict[str, Any] = {"skipped": []}
    if len(unreadable):
        details["unreadable"] = [dataset.source_key(int(i)) for i in unreadable]
    for d, dom in enumerate(dataset.domains):
        for group, mask in (("C1", ~is_c2), ("C2", is_c2)):
            rows = np.flatnonzero((domains == d) & mask)
            key = f"{dom}/{group}"
            if len(rows) == 0:
                details["skipped"].append(key)
                continue
            m = classification_metrics(scores[rows], labels[rows], dataset.classes)
            flat.update({f"{key}/{name}": m[name] for name in ("top1", "top1_balanced", "top5")})
            details[key] = m
    return flat, details


def class_prompts_names(dataset) -> list[str]:
    """Class names as written in prompts (underscores become spaces)."""
    return [c.replace("_", " ") for c in dataset.classes]


def clip_scores(get_model: Callable[[], Any], dataset, indices: np.ndarray, classnames: Sequence[str],
                templates: Sequence[str], image_size: int, cache: TensorCache | None = None,
                checkpoint_key: str | None = None, batch_size: int = 256, dataset_hash: str | None = None,
                precision: str = "fp32") -> torch.Tensor:
    """Cosine scores [N, K] of images vs class heads. `get_model` is called only on a cache miss,
    so a fully cached evaluation never loads the checkpoint; it must return the model already in
    `precision` (images are cast to the model's dtype), which names the cache entries. `dataset_hash`
    saves re-hashing dataset.content_hash() (all pixels) per checkpoint."""
    def feats() -> torch.Tensor:
        m = get_model()
        p = next(m.parameters())
        return encode_dataset(lambda x: m.encode_image(x.to(p.dtype), normalize=True), dataset, indices, image_size,
                              batch_size, p.device)

    def head() -> torch.Tensor:
        return get_model().zero_shot_head(list(classnames), list(templates)).float().cpu()

    if cache is None or checkpoint_key is None:
        return feats() @ head().T
    base = {"checkpoint": checkpoint_key, "dataset": dataset_hash or dataset.content_hash()}
    if precision != "fp32":  # fp32 keys stay those of earlier versions, so existing caches stay valid
        base["precision"] = precision
    image_feats = cache.get_or_compute({**base, "kind": "image_features", "indices": hash_obj(indices),
                                        "transform": eval_transform_description(image_size)}, feats)
    class_emb = cache.get_or_compute({**base, "kind": "zero_shot_head", "classnames": list(classnames),
                                      "templates": list(templates)}, head)
    return image_feats @ class_emb.T


def zero_shot(model, dataset, indices: np.ndarray | None = None, classnames: Sequence[str] | None = None,
              templates: Sequence[str] | None = None, c2_classes: Sequence[str] | None = None,
              cache: TensorCache | None = None, checkpoint_key: str | None = None, batch_size: int = 256
              ) -> dict[str, Any]:
    """Zero-shot metrics of a HookedCLIP over `dataset` (default: its test split).

    Returns {"metrics": flat floats keyed "{domain}/{C1|C2}/{top1|top1_balanced|top5}",
    "details": per-group per-class accuracy and confusion}. With `cache` and `checkpoint_key`
    (e.g. the checkpoint file hash), image features and the class head are cached. Cost: one image
    forward per sample + K x T text forwards (both skipped on a cache hit).
    """
    indices = dataset.indices(split="test") if indices is None else np.asarray(indices, dtype=np.int64)
    classnames = list(classnames) if classnames is not None else class_prompts_names(dataset)
    templates = get_templates(list(templates) if templates is not None else "auto", dataset.name)
    c2 = list(c2_classes) if c2_classes is not None else list(dataset.default_test_classes or [])
    scores = clip_scores(lambda: model, dataset, indices, classnames, templates, model.image_size, cache,
                         checkpoint_key, batch_size)
    flat, details = group_metrics(scores, dataset, indices, c2)
    return {"metrics": flat, "details": details}


def evaluate_run(run_dir: str | Path, dataset=None, templates: str | list[str] | None = None,
                 cache_dir: str | Path | None = None, batch_size: int | None = None,
                 device: str | None = None, verify: str | None = None, precision: str | None = None) -> Path:
    """Evaluate every epoch_N.pt of a run; writes RUN_DIR/eval/results.json, eval/details.json and
    eval/meta.json ({"precision", "templates", "n_test_images", "c2_classes"}).

    dataset: a DomainDataset or name/root (default: the run config's). templates: a spec for
    clipmech.eval.templates.get_templates (default: the run config's [eval] templates). The test split
    is evaluated; C2 = the run's [mixture] test_classes or the dataset's default. Cost per checkpoint:
    one image pass over the test split + the text head; both cached under RUN_DIR/eval/cache.
    verify: file check when loading a DomainNet folder (default: the run's [data] verify). Unreadable
    images are skipped and listed in RUN_DIR/eval/unreadable.txt; more than [data] max_unreadable of
    them raise UnreadableImagesError. precision: "fp32", or "fp16" = the paper's half-precision model
    (`precision_dtype`; cached features of the two precisions are kept apart); default: the run
    config's [eval] precision, so `clipmech train` and `experiment run` evaluate as configured. Returns the path of
    results.json.
    """
    from clipmech.models.configs import model_config
    from clipmech.train.run_dir import checkpoints, run_config
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    precision = precision or cfg["eval"]["precision"]
    dtype = precision_dtype(precision)
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no epoch_N.pt checkpoints in {run_dir}")
    if dataset is None or isinstance(dataset, (str, Path)):
        from clipmech.data import load_dataset
        dataset = load_dataset(str(dataset or cfg["data"]["dataset"]), verify=verify or cfg["data"]["verify"])
    c2 = cfg["mixture"]["test_classes"] or dataset.default_test_classes or []
    batch_size = batch_size or cfg["eval"]["batch_size"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = TensorCache(Path(cache_dir) if cache_dir else run_dir / "eval" / "cache")
    supervised = cfg["train"]["objective"] == "supervised"
    image_size = model_config(cfg)[1]["vision_cfg"]["image_size"]
    classnames = class_prompts_names(dataset)
    templates = get_templates(templates if templates is not None else cfg["eval"]["templates"], dataset.name)
    indices = dataset.indices(split="test")
    ds_hash = dataset.content_hash()

    results: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    unreadable: set[str] = set()
    for epoch, path in found:
        key = file_hash(path)
        if supervised:
            from clipmech.train.supervised import SupervisedClassifier
            load = functools.cache(lambda p=path: SupervisedClassifier.from_checkpoint(p).to(device, dtype).eval())
            scores = cache.get_or_compute(
                {"checkpoint": key, "dataset": ds_hash, "kind": "supervised_logits",
                 "indices": hash_obj(indices), "transform": eval_transform_description(image_size),
                 **({"precision": precision} if precision != "fp32" else {})},
                # the last C logits: a merged 1000 + C head (docs/methods.md#training) or a plain C head
                lambda: encode_dataset(lambda x: load()(x.to(dtype))[:, -len(dataset.classes):], dataset, indices,
                                       image_size, batch_size, device))
        else:
            from clipmech.models.hooked_clip import HookedCLIP
            load = functools.cache(lambda p=path: HookedCLIP.from_checkpoint(p).to(device, dtype).eval())
            scores = clip_scores(load, dataset, indices, classnames, templates, image_size, cache, key, batch_size,
                                 ds_hash, precision)
        results[str(epoch)], details[str(epoch)] = group_metrics(scores, dataset, indices, c2)
        unreadable.update(details[str(epoch)].get("unreadable", []))
    summary = report_unreadable(unreadable, len(indices), run_dir / "eval" / "unreadable.txt",
                                cfg["data"]["max_unreadable"], "test images")
    if summary:
        print(f"clipmech eval: {summary}")
    atomic_write_json(details, run_dir / "eval" / "details.json", indent=None)
    atomic_write_json({"precision": precision, "templates": len(templates), "n_test_images": len(indices),
                       "c2_classes": list(c2)}, run_dir / "eval" / "meta.json")
    return atomic_write_json(results, run_dir / "eval" / "results.json")
