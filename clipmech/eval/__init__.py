"""Evaluation: zero-shot DG/CG accuracy per domain x {C1, C2} with cached image features."""
from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy re-exports (PEP 562): importing the package for its CLI module must not import torch.
    if name in ("DOMAINNET_TEMPLATES", "EMOJI_TEMPLATES", "get_templates"):
        from clipmech.eval import templates
        return getattr(templates, name)
    if name in ("classification_metrics", "evaluate_run", "zero_shot"):
        from clipmech.eval import zeroshot
        return getattr(zeroshot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DOMAINNET_TEMPLATES", "EMOJI_TEMPLATES", "classification_metrics", "evaluate_run", "get_templates",
           "zero_shot"]
