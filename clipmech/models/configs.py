"""Model configurations: clipmech's tiny CPU presets and resolution of open_clip config names.

Presets are dicts in open_clip's own format (`embed_dim`, `vision_cfg`, `text_cfg`), so every model
clipmech builds is an ordinary `open_clip.model.CLIP`.
"""
from __future__ import annotations

import copy
from typing import Any

import open_clip

from clipmech.utils import unknown_name_error

_TINY_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}

PRESETS: dict[str, dict[str, Any]] = {
    # ModifiedResNet with one bottleneck per stage; 64 px input gives a 2x2 map at layer4.
    "tiny-rn": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
        "text_cfg": dict(_TINY_TEXT),
    },
    # 2-block ViT, 8 px patches on 64 px images (64 tokens + CLS).
    "tiny-vit": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
        "text_cfg": dict(_TINY_TEXT),
    },
}


def resolve_config(name_or_cfg: str | dict) -> tuple[str | None, dict[str, Any]]:
    """(name, cfg) for a preset name, an open_clip config name or an open_clip-format dict."""
    if isinstance(name_or_cfg, dict):
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(name_or_cfg)
        if missing:
            raise ValueError(f"model config dict lacks {sorted(missing)}; expected open_clip's format "
                             "{'embed_dim', 'vision_cfg', 'text_cfg'}")
        return None, copy.deepcopy(name_or_cfg)
    if name_or_cfg in PRESETS:
        return name_or_cfg, copy.deepcopy(PRESETS[name_or_cfg])
    cfg = open_clip.get_model_config(name_or_cfg)
    if cfg is None:
        raise unknown_name_error("model config", name_or_cfg, list(PRESETS) + open_clip.list_models())
    return name_or_cfg, copy.deepcopy(cfg)


def create_open_clip(name_or_cfg: str | dict) -> open_clip.model.CLIP:
    """A randomly initialised open_clip CLIP for a preset, open_clip name or config dict."""
    _, cfg = resolve_config(name_or_cfg)
    cfg = {k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype")}
    model = open_clip.model.CLIP(**cfg)
    model.eval()
    return model


def model_config(run_cfg: dict) -> tuple[str | None, dict[str, Any]]:
    """(name, open_clip model cfg) for a run config's [model] section (its image_size applied)."""
    name, cfg = resolve_config(run_cfg["model"]["name"])
    if run_cfg["model"]["image_size"] is not None:
        cfg["vision_cfg"]["image_size"] = int(run_cfg["model"]["image_size"])
    return name, cfg
