"""ImageNet-1k zero-shot top-1 of every checkpoint (docs/methods.md#evaluation "imagenet-val total"), optionally fp16.

Layout read: the ImageNet val folder as torchvision's ImageFolder expects it, ROOT/{wnid}/*.JPEG (or
ROOT/val/{wnid}/*), 1000 WordNet-id folders whose sorted order is the ImageNet class order. Prompts:
open_clip's OpenAI class names and its 80 OpenAI ImageNet templates, as the paper. Preprocessing is the
DomainNet evaluation's (resize bicubic, centre crop, OpenAI mean/std). fp16 = the paper's half-precision
model: weights and images cast to float16 (on GPU; CPU fp16 kernels are slow and serve tests only).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipmech.data.dataset import DomainDataset
from clipmech.data.imagenet_mapping import wnid_folders
from clipmech.eval.templates import OPENAI_TEMPLATES
from clipmech.eval.zeroshot import encode_dataset, precision_dtype
from clipmech.train.run_dir import checkpoints
from clipmech.utils import TensorCache, atomic_write_json, file_hash, hash_obj

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def imagenet_val(root: str | Path) -> DomainDataset:
    """The ImageNet val folder as a one-domain DomainDataset ("imagenet", split "test"); classes are
    the 1000 WordNet ids in sorted order (the OpenAI names are not unique: two 'missile', two
    'sunglasses'). Raises FileNotFoundError / ValueError naming the folder when the layout is wrong."""
    base, folders = wnid_folders(root, "val", "ImageNet val")
    sources, labels = [], []
    for k, folder in enumerate(folders):
        files = sorted(str(p.resolve()) for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        sources += files
        labels += [k] * len(files)
    if not sources:
        raise ValueError(f"{base}: the 1000 class folders hold no .JPEG/.jpg/.png images")
    n = len(sources)
    return DomainDataset("imagenet-val", ["imagenet"], [f.name for f in folders], np.zeros(n, np.int64),
                         np.asarray(labels, np.int64), np.full(n, "test"), sources=sources,
                         natural_domain="imagenet", root=str(base.resolve()))


def imagenet_scores(model, dataset: DomainDataset, precision: str = "fp32", batch_size: int = 256,
                    cache: TensorCache | None = None, checkpoint_key: str | None = None,
                    templates: Sequence[str] = OPENAI_TEMPLATES) -> torch.Tensor:
    """Cosine scores [N, 1000] of the val images against the OpenAI-name x `templates` head (the
    paper: open_clip's 80 OpenAI templates).
    `model` is a HookedCLIP on its device (or a zero-argument loader, called on a cache miss only).
    Cost: one image pass over the val set + 80,000 prompt encodings; both cached with `cache`."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    dtype = precision_dtype(precision)

    @functools.cache
    def cast():
        m = model if isinstance(model, torch.nn.Module) else model()
        return copy.deepcopy(m).to(dtype) if dtype != torch.float32 else m  # never cast the caller's model

    def feats() -> torch.Tensor:
        m = cast()
        return encode_dataset(lambda x: m.encode_image(x.to(dtype), normalize=True), dataset,
                              dataset.indices(), m.image_size, batch_size, next(m.parameters()).device)

    def head() -> torch.Tensor:
        return cast().zero_shot_head(list(IMAGENET_CLASSNAMES), list(templates)).float().cpu()

    if cache is None or checkpoint_key is None:
        with torch.no_grad():
            return feats() @ head().T
    base = {"checkpoint": checkpoint_key, "dataset": dataset.root, "precision": precision}
    with torch.no_grad():
        # the checkpoint fixes the image size, hence the transform
        image_feats = cache.get_or_compute({**base, "kind": "imagenet_image_features",
                                            "files": hash_obj(dataset.sources)}, feats)
        class_emb = cache.get_or_compute({**base, "kind": "imagenet_zero_shot_head", "templates": list(templates)},
                                         head)
    return image_feats @ class_emb.T


def imagenet_top1(scores: torch.Tensor, dataset: DomainDataset) -> dict[str, Any]:
    """{"imagenet-val total": top-1 accuracy, "n": images} for scores [N, 1000]."""
    labels = torch.as_tensor(dataset.class_idx)
    return {"imagenet-val total": (scores.argmax(1) == labels).float().mean().item(), "n": int(len(labels))}


def evaluate_run_imagenet(run_dir: str | Path, root: str | Path, precision: str = "fp32", batch_size: int = 256,
                          device: str | None = None) -> Path:
    """ImageNet-1k zero-shot top-1 of every epoch_N.pt of a CLIP run -> RUN_DIR/eval/imagenet.json
    {"precision", "n_images", "results": {epoch: top1}}. Features and heads are cached under
    RUN_DIR/eval/cache. Raises ValueError for a supervised run (its head is DomainNet's)."""
    from clipmech.models.hooked_clip import HookedCLIP
    from clipmech.train.run_dir import run_config

    run_dir = Path(run_dir)
    if run_config(run_dir)["train"]["objective"] != "clip":
        raise ValueError(f"{run_dir} is a supervised run; ImageNet zero-shot needs a CLIP text tower")
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no epoch_N.pt checkpoints in {run_dir}")
    dataset = imagenet_val(root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = TensorCache(run_dir / "eval" / "cache")
    results = {}
    for epoch, path in found:
        scores = imagenet_scores(lambda p=path: HookedCLIP.from_checkpoint(p).to(dev).eval(), dataset, precision,
                                 batch_size, cache, file_hash(path))
        results[str(epoch)] = imagenet_top1(scores, dataset)["imagenet-val total"]
    return atomic_write_json({"precision": precision, "n_images": len(dataset), "root": dataset.root,
                              "templates": "open_clip OPENAI_IMAGENET_TEMPLATES (80)", "results": results},
                             run_dir / "eval" / "imagenet.json")
