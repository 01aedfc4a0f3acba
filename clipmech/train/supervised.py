"""Supervised baseline (paper.md §6): a randomly initialised CLIP image tower -> ReLU -> Linear head.

Trained by clipmech.train.train with `[train] objective = "supervised"` on the same mixtures (labels
= the mixture's class indices); `PAPER_RECIPE` holds the paper's optimiser settings. Evaluated by
clipmech.eval with the same metrics (argmax over the class logits instead of text prompts).
"""
from __future__ import annotations

from pathlib import Path

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
