"""CLIPs someone else trained: open_clip models with pretrained weights, Hugging Face CLIPModels.

`load_open_clip` goes through open_clip's own loader (`create_model_and_transforms`), so every
pretrained tag (`openai`, `laion2b_s34b_b79k`, ...), local weight file (.pt / .bin / .safetensors,
open_clip or OpenAI layout) and `hf-hub:ORG/NAME` id that open_clip reads works here, and OpenAI
specifics come along: a tag trained with QuickGELU (all `openai` tags) gets `force_quick_gelu` unless
the caller decides otherwise, and ModifiedResNet keeps open_clip's attention pool. Downloads happen
only for tags and hub ids (on the user's machine; set HF_HUB_OFFLINE=1 to forbid them).

`open_clip_from_hf` converts a transformers `CLIPModel` with ViT towers into an open_clip CLIP with
the same numbers: q/k/v projections fused into `in_proj`, the projections transposed, text pooling
at the first `eos_token_id` (or the highest token id for legacy configs with eos_token_id 2, as
transformers does).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
from torch import nn

from clipmech.data.preprocess import OPENAI_MEAN, OPENAI_STD
from clipmech.errors import BadInputError, CheckpointError
from clipmech.models.checkpoints import checkpoint_state, load_state_strict
from clipmech.models.configs import PRESETS, create_open_clip
from clipmech.utils import check_checkpoint_file, read_checkpoint, unknown_name_error

OPENAI_MEAN_STD = (OPENAI_MEAN, OPENAI_STD)


def load_open_clip(name: str | None, pretrained: str | os.PathLike | None,
                   **open_clip_kwargs: Any) -> tuple[open_clip.model.CLIP, dict[str, Any]]:
    """(CLIP in eval mode on CPU, preprocessing config) from open_clip's loader.

    name: an open_clip model name (`RN50`, `ViT-B-32`, ...), `hf-hub:ORG/NAME`, or a clipmech preset
    (`tiny-rn`, `tiny-vit`; then `pretrained` must be a local file). pretrained: a tag of that model,
    a local weight file, or `hf-hub:ORG/NAME` (then `name` may be None). open_clip_kwargs go to
    `open_clip.create_model_and_transforms` (e.g. force_quick_gelu, force_image_size, cache_dir).
    A local file gets clipmech's checkpoint checks first (`check_checkpoint_file`): a missing file, a
    folder, an empty, foreign or truncated file, or weights of another architecture are named
    (CheckpointError, exit 4). Cost: building the model + reading (or downloading) its weights.
    """
    if pretrained is not None and str(pretrained).startswith("hf-hub:"):
        name, pretrained = str(pretrained), None
    if name is None:
        raise ValueError("pass a model name (e.g. 'RN50', 'ViT-B-32', 'tiny-rn') or pretrained='hf-hub:ORG/NAME'")
    if name in PRESETS:
        return _load_preset(name, pretrained, open_clip_kwargs)
    local = None
    if not name.startswith("hf-hub:"):
        if open_clip.get_model_config(name) is None:
            raise unknown_name_error("model", name, list(PRESETS) + open_clip.list_models())
        if pretrained is None:
            raise ValueError(f"from_pretrained({name!r}) needs pretrained=: a tag "
                             f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}) or a "
                             "local weight file; for random weights use HookedCLIP.from_config")
        tag = open_clip.get_pretrained_cfg(name, str(pretrained))
        if tag.get("quick_gelu") and "force_quick_gelu" not in open_clip_kwargs and not name.endswith("quickgelu"):
            open_clip_kwargs["force_quick_gelu"] = True  # the tag was trained with QuickGELU (all OpenAI weights)
        if not tag:
            if not Path(pretrained).exists():
                raise FileNotFoundError(f"{str(pretrained)!r} is neither a pretrained tag of {name} (known: "
                                        f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}) "
                                        "nor an existing weight file")
            local = check_checkpoint_file(pretrained)
    try:
        with _one_retry_warning():
            model = open_clip.create_model(name, pretrained=None if pretrained is None else str(pretrained),
                                           require_pretrained=True, **open_clip_kwargs)
    except RuntimeError as err:
        raise _load_failure(err, name, pretrained, local) from err
    return model.eval(), dict(open_clip.get_model_preprocess_cfg(model))


def _load_failure(err: RuntimeError, name: str, pretrained: Any, local: Path | None) -> Exception:
    """A named error for open_clip's loader failing: weights of another architecture (CheckpointError),
    a download that cannot happen (BadInputError), else `err` itself."""
    text = str(err)
    if local is not None and "loading state_dict" in text:
        problems = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        return CheckpointError(f"weight file {local} does not match the architecture of {name} (another model?): "
                               + "; ".join(p[:160] for p in problems[:3]))
    if "Failed to download" in text:
        return BadInputError(f"could not download the weights {pretrained or name!r} of {name} (offline, or no such "
                             "files on the hub?); download them where there is a network (open_clip caches them, "
                             "see cache_dir) or pass a local weight file; HF_HUB_OFFLINE=1 skips the retries")
    return err


# Loggers of huggingface_hub's retry loop (HEAD / GET with backoff) and of urllib3's retries; open_clip
# logs the final failure on the root logger before raising it (clipmech raises it as one line).
_RETRY_LOGGERS = ("huggingface_hub.utils._http", "urllib3.connectionpool")


class _OneNotice(logging.Filter):
    """Replaces a download's retry warnings by one stderr line (at the first) and drops open_clip's
    root-logger copy of the final error."""

    def __init__(self) -> None:
        super().__init__()
        self.told = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root":
            return not record.getMessage().startswith("Failed to download")
        if not self.told:
            self.told = True
            cause = record.getMessage().split(" thrown while requesting")[0]
            print(f"clipmech: download failed ({cause[:200]}); retrying quietly for about a minute "
                  "(HF_HUB_OFFLINE=1 skips downloads)", file=sys.stderr, flush=True)
        return False


@contextlib.contextmanager
def _one_retry_warning() -> Iterator[None]:
    """While open_clip downloads, Hugging Face Hub's repeated 'thrown while requesting' / 'Retrying
    in Ns' warnings collapse to one line. The filters are removed afterwards (no global change)."""
    loggers = [logging.getLogger(n) for n in _RETRY_LOGGERS] + [logging.getLogger()]
    only = _OneNotice()
    for lg in loggers:
        lg.addFilter(only)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(only)


def _load_preset(name: str, path: str | os.PathLike | None, kwargs: dict) -> tuple[open_clip.model.CLIP, dict]:
    """A clipmech preset with weights from a local file: open_clip's own layout (open_clip's
    load_checkpoint) or a clipmech training checkpoint, which is built at its own image size."""
    if kwargs:
        raise ValueError(f"open_clip options {sorted(kwargs)} apply to open_clip model names, not the preset {name!r}")
    if path is None or not (Path(path).exists() or os.sep in str(path) or Path(path).suffix):
        raise FileNotFoundError(f"preset {name!r} has no pretrained tags; pass pretrained= a local weight file "
                                f"(got {path!r})")
    if not Path(path).exists():
        raise FileNotFoundError(f"weight file {path} does not exist (the preset {name!r} has no pretrained tags)")
    check_checkpoint_file(path)
    model = create_open_clip(name)
    if Path(path).suffix != ".safetensors":
        obj = read_checkpoint(path)
        if isinstance(obj, dict) and isinstance(obj.get("model_cfg"), dict):  # a clipmech training checkpoint
            model = create_open_clip(_stored_preset_cfg(name, obj["model_cfg"], path))
        load_state_strict(model, checkpoint_state(obj, path), f"{path} (preset {name})")
    else:
        try:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except RuntimeError as err:
            raise _load_failure(err, name, path, Path(path)) from err
    size = model.visual.image_size
    return model.eval(), {"size": size, "mean": OPENAI_MEAN_STD[0], "std": OPENAI_MEAN_STD[1],
                          "interpolation": "bicubic", "resize_mode": "shortest"}


def _stored_preset_cfg(name: str, stored: dict[str, Any], path: Any) -> dict[str, Any]:
    """The config a clipmech checkpoint stores, when it is preset `name` at any image size (training
    runs choose theirs); CheckpointError naming the difference otherwise."""
    preset = copy.deepcopy(PRESETS[name])
    size = stored.get("vision_cfg", {}).get("image_size", preset["vision_cfg"]["image_size"])
    preset["vision_cfg"]["image_size"] = size
    if stored != preset:
        differ = sorted(k for k in set(stored) | set(preset) if stored.get(k) != preset.get(k))
        raise CheckpointError(f"checkpoint {path} holds another model than the preset {name!r} (its config differs "
                              f"in {', '.join(differ)}); load it with HookedCLIP.from_checkpoint or pass its run "
                              "folder as RUN_DIR")
    return preset


def open_clip_from_hf(hf: nn.Module) -> tuple[open_clip.model.CLIP, dict[str, Any]]:
    """(open_clip CLIP holding a copy of the weights of a transformers CLIPModel, its open_clip cfg).

    Supports CLIPModel with ViT towers, `quick_gelu` or `gelu` MLPs and LayerNorm eps 1e-5 (all
    released CLIP checkpoints); anything else raises ValueError naming the setting.
    """
    from transformers import CLIPModel

    if not isinstance(hf, CLIPModel):
        raise ValueError(f"from_hf needs a transformers CLIPModel, got {type(hf).__name__}")
    vc, tc = hf.config.vision_config, hf.config.text_config
    acts = {vc.hidden_act, tc.hidden_act}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) > 1:
        raise ValueError(f"unsupported activations {sorted(acts)}: HookedCLIP converts CLIPModels whose towers "
                         "both use quick_gelu or both use gelu")
    for part, c in (("vision", vc), ("text", tc)):
        if c.layer_norm_eps != 1e-5:
            raise ValueError(f"{part} layer_norm_eps {c.layer_norm_eps} is not supported (open_clip uses 1e-5)")
    eos = tc.eos_token_id
    cfg = {
        "embed_dim": hf.config.projection_dim,
        "quick_gelu": vc.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": vc.image_size, "patch_size": vc.patch_size, "width": vc.hidden_size,
                       "layers": vc.num_hidden_layers, "head_width": vc.hidden_size // vc.num_attention_heads,
                       "mlp_ratio": vc.intermediate_size / vc.hidden_size},
        "text_cfg": {"context_length": tc.max_position_embeddings, "vocab_size": tc.vocab_size,
                     "width": tc.hidden_size, "heads": tc.num_attention_heads, "layers": tc.num_hidden_layers,
                     "mlp_ratio": tc.intermediate_size / tc.hidden_size,
                     # transformers: legacy configs (eos_token_id 2) pool at the highest id, others at the first eos
                     **({"pool_type": "argmax"} if eos == 2 else {"pool_type": "eos", "eos_id": int(eos)})},
    }
    clip = create_open_clip(cfg)
    clip.load_state_dict(_hf_state_dict(hf))
    return clip.eval(), cfg


def _hf_state_dict(hf: nn.Module) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights under open_clip CLIP's state_dict keys."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    v, t = "vision_model.", "text_model."
    out = {
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"], "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"], "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": sd[t + "final_layer_norm.weight"], "ln_final.bias": sd[t + "final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for src, dst, n in ((v, "visual.transformer.resblocks.", hf.config.vision_config.num_hidden_layers),
                        (t, "transformer.resblocks.", hf.config.text_config.num_hidden_layers)):
        for i in range(n):
            a, b = f"{src}encoder.layers.{i}.", f"{dst}{i}."
            for kind in ("weight", "bias"):
                out[f"{b}attn.in_proj_{kind}"] = torch.cat([sd[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{b}attn.out_proj.{kind}"] = sd[f"{a}self_attn.out_proj.{kind}"]
                out[f"{b}ln_1.{kind}"] = sd[f"{a}layer_norm1.{kind}"]
                out[f"{b}ln_2.{kind}"] = sd[f"{a}layer_norm2.{kind}"]
                out[f"{b}mlp.c_fc.{kind}"] = sd[f"{a}mlp.fc1.{kind}"]
                out[f"{b}mlp.c_proj.{kind}"] = sd[f"{a}mlp.fc2.{kind}"]
    return out
