"""Training: contrastive CLIP on clipmech mixtures (CPU, GPU, torchrun DDP) and the supervised baseline."""
from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy re-exports (PEP 562): importing the package for its CLI module must not import torch.
    if name in ("DEFAULTS", "load_config"):
        from clipmech.train import config
        return getattr(config, name)
    if name in ("NonFiniteLossError", "train"):
        from clipmech.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULTS", "NonFiniteLossError", "load_config", "train"]
