"""Supervised baseline (docs/methods.md#training): a randomly initialised CLIP image tower -> ReLU -> Linear head.

Trained by clipmech.train.train with `[train] objective = "supervised"` on the same mixtures;
`PAPER_RECIPE` holds the paper's optimiser settings. Labels (`supervised_labels`): with base /
ImageNet-Sketch lines (ImageNet folder layout), the paper's merge through its class mapping — ImageNet
class k -> 1000 + j when it maps to DomainNet class j, else k; DomainNet class j -> 1000 + j — and a
1000 + C-way head (1345 on DomainNet); without them, the C dataset classes. Evaluated by
clipmech.eval on the LAST C logits (the paper's "last 345"), with the same metrics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from torch import nn

from clipmech.utils import read_checkpoint

# SGD Nesterov 0.9, lr 0.01, wd 1e-4 (none on norms/biases), x0.1 at epochs 30/50/70, 90 epochs, batch 256.
PAPER_RECIPE = {
    "train": {"objective": "supervised", "epochs": 90, "batch_size": 256},
    "optim": {"name": "sgd", "lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9},
    "schedule": {"kind": "step", "warmup": 0, "milestones": [30, 50, 70], "gamma": 0.1},
}


def supervised_labels(mixture) -> tuple[torch.Tensor, int]:
    """(int64 labels [len(mixture)] in training-view order: base lines, extra lines, dataset samples;
    number of classes). Cost: one folder listing per ImageNet root, O(N)."""
    from clipmech.data.imagenet_mapping import N_IMAGENET, imagenet_class_of_path, merged_labels

    ds = mixture.dataset
    classes = torch.as_tensor(ds.class_idx[np.asarray(mixture.indices, dtype=np.int64)])
    lines = [*(getattr(mixture, "base_lines", None) or []), *(getattr(mixture, "extra_lines", None) or [])]
    if not lines:
        return classes, len(ds.classes)
    imagenet, _ = merged_labels(list(ds.classes))
    base = torch.as_tensor([imagenet[imagenet_class_of_path(line.split("\t", 1)[0])] for line in lines],
                           dtype=torch.int64)
    return torch.cat([base, N_IMAGENET + classes]), N_IMAGENET + len(ds.classes)


class SupervisedClassifier(nn.Module):
    """images [B,3,S,S] -> logits [B, num_classes]; `visual` is open_clip's image tower for `model_cfg`."""

    def __init__(self, model_cfg: dict, num_classes: int):
        super().__init__()
        self.model_cfg = model_cfg
        self.num_classes = num_classes
        self.visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
        self.head = nn.Linear(model_cfg["embed_dim"], num_classes)

    @property
    def image_size(self) -> int:
        return int(self.model_cfg["vision_cfg"]["image_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.visual(images)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "SupervisedClassifier":
        """Load an epoch_N.pt written by a supervised run (CPU, eval mode)."""
        ckpt = read_checkpoint(path)
        if ckpt.get("objective") != "supervised":
            raise ValueError(f"{path} is not a supervised-baseline checkpoint (objective "
                             f"{ckpt.get('objective')!r}); load CLIP checkpoints with HookedCLIP.from_checkpoint")
        model = cls(ckpt["model_cfg"], ckpt["num_classes"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()


def supervised_step(model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], autocast,
                    scaler, check_finite) -> float:
    """Cross-entropy forward + backward over the micro-batches (gradients averaged); returns the loss."""
    total = 0.0
    for images, labels in micro_batches:
        with autocast():
            loss = F.cross_entropy(model(images), labels) / len(micro_batches)
        check_finite(loss)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    return total
