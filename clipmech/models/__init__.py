"""CLIP models: HookedCLIP (open_clip CLIP with TransformerLens hook points) and model configs.

Attributes are imported on first use so `import clipmech.models` (e.g. by the CLI) stays cheap.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ClipActivationCache", "HookedCLIP", "PRESETS", "create_open_clip", "resolve_config"]


def __getattr__(name: str) -> Any:
    if name == "HookedCLIP":
        from clipmech.models.hooked_clip import HookedCLIP
        return HookedCLIP
    if name == "ClipActivationCache":
        from clipmech.models.activation_cache import ClipActivationCache
        return ClipActivationCache
    if name in ("PRESETS", "create_open_clip", "resolve_config"):
        from clipmech.models import configs
        return getattr(configs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
