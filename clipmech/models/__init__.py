"""CLIP models: HookedCLIP (open_clip CLIP with TransformerLens hook points) and model configs.

Attributes are imported lazily so `import clipmech.models` (e.g. by the CLI) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HookedCLIP": "clipmech.models.hooked_clip",
    "PRESETS": "clipmech.models.configs",
    "resolve_config": "clipmech.models.configs",
    "create_open_clip": "clipmech.models.configs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
