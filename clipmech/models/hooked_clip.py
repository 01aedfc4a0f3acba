"""HookedCLIP: an open_clip CLIP (ResNet or ViT image tower + text tower) with TransformerLens hook points.

The model holds open_clip's own submodules (same parameter objects, same `state_dict` keys as
`open_clip.model.CLIP`), so open_clip / open_clip_train checkpoints load unchanged and
`to_open_clip()` round-trips. Only the forward pass is ours: open_clip's forward fuses steps that
interpretability needs to see (nn.MultiheadAttention hides per-head q/k/v/z, Bottleneck adds the
skip in place, AttentionPool2d calls F.multi_head_attention_forward), and no library provides a
hooked ResNet CLIP (TransformerLens has no CLIP, ViT-Prisma is ViT-only). The hook machinery
itself is TransformerLens' `HookPoint` / `HookedRootModule`, reused as is.

Hook points are not registered as submodules (their names do not follow open_clip's module paths,
and they carry no state); `hook_dict` / `mod_dict` map each TransformerLens-style name to its
HookPoint, in firing order. Layouts: conv maps [B,C,H,W]; tokens [B,T,D]; per-head q/k/v/z
[B,T,H,d_head]; attention pattern [B,H,Tq,Tk].

  ResNet  visual.hook_input, visual.hook_act1..3, visual.hook_avgpool,
          visual.layer{L}.{i}.hook_act1 / hook_act2 / hook_branch (bn3, before the add) / hook_skip /
          hook_out (after add + ReLU), visual.attnpool.hook_q / k / v / pattern / z / out
          (q, pattern, z for the pooled mean-token query only: Tq = 1)
  ViT     visual.hook_input, visual.hook_patch_embed [B,N,D], visual.hook_embed (cls + positions),
          visual.ln_pre.hook_normalized, visual.blocks.{i}.<block>, visual.ln_post.hook_normalized,
          visual.hook_pooled, visual.hook_proj
  text    text.hook_embed, text.blocks.{i}.<block>, text.ln_final.hook_normalized, text.hook_pooled,
          text.hook_proj
  <block> hook_resid_pre, ln1.hook_normalized, attn.hook_q / k / v / pattern / z, hook_attn_out,
          hook_resid_mid, ln2.hook_normalized, mlp.hook_pre, mlp.hook_post, hook_mlp_out, hook_resid_post
  both    hook_image_embed, hook_image_embed_normalized, hook_text_embed, hook_text_embed_normalized

`run_with_cache` returns a `ClipActivationCache` (clipmech.models.activation_cache), a dict with
batch slicing, `to`, `remove_batch_dim` and stacking; docs/hooks.md lists every point with its shape.

Attention uses `F.scaled_dot_product_attention` unless a hook sits on the pattern point, in which
case softmax(q k^T / sqrt(d)) is materialised so it can be read or rewritten.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import (LayerScale, QuickGELU, ResidualAttentionBlock, VisionTransformer,
                                   text_global_pool)
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from clipmech.models.activation_cache import MODEL_LANGUAGE_MODEL_ONLY, ClipActivationCache, language_model_only
from clipmech.models.checkpoints import checkpoint_state, load_state_strict
from clipmech.models.configs import create_open_clip, resolve_config
from clipmech.utils import atomic_torch_save, read_checkpoint, unknown_name_error

NamesFilter = None | str | Sequence[str] | Callable[[str], bool]

_BLOCK_POINTS = {  # field -> name suffix inside a transformer block, in forward order
    "resid_pre": "hook_resid_pre", "ln1": "ln1.hook_normalized",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
    "pattern": "attn.hook_pattern", "z": "attn.hook_z", "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid", "ln2": "ln2.hook_normalized",
    "mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post", "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
_BOTTLENECK_POINTS = {"act1": "hook_act1", "act2": "hook_act2", "branch": "hook_branch",
                      "skip": "hook_skip", "out": "hook_out"}
_HEADS_POINTS = {"q": "hook_q", "k": "hook_k", "v": "hook_v", "pattern": "hook_pattern", "z": "hook_z"}


class _NameTable(dict):
    """name -> HookPoint; a missing name raises KeyError with the 3 closest valid names."""

    def __missing__(self, key: str):
        raise unknown_name_error("hook point", key, self.keys())


class _Stop(Exception):
    """Raised by the stop_at hook to end a forward early; carries the activation."""

    def __init__(self, value: Tensor):
        super().__init__("forward stopped early")
        self.value = value


def _group(table: _NameTable, prefix: str, spec: dict[str, str]) -> SimpleNamespace:
    """Create one HookPoint per `spec` entry named `prefix + suffix`, recorded in `table`."""
    points = {}
    for field, suffix in spec.items():
        hp = HookPoint()
        hp.name = prefix + suffix
        table[hp.name] = hp
        points[field] = hp
    return SimpleNamespace(**points)


def _is_hooked(hp: HookPoint) -> bool:
    """True if `hp` has a hook or is being cached (its value is needed, not just passed through)."""
    return bool(hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks or hp._backward_pre_hooks
                or "forward" in hp.__dict__)


def _store(cache: dict[str, Tensor], name: str, device: torch.device | None, x: Tensor) -> Tensor:
    cache[name] = x.detach() if device is None else x.detach().to(device)
    return x


@contextlib.contextmanager
def _fast_cache(points: Sequence[HookPoint], cache: dict[str, Tensor], device: torch.device | None = None):
    """Cache the values of hook points that carry no hooks by swapping in a storing identity
    `forward`: a module without hooks takes torch's fast call path, whereas a TransformerLens caching
    hook costs a registration, a hooked call and a wrapper per point (1.5-1.7x a plain forward when
    every point of a ViT is cached). Each value is moved to `device` as it is produced, so a GPU run
    cached to the CPU never holds all of them on the GPU. The instance attributes are removed on
    every exit path."""
    try:
        for hp in points:
            hp.forward = functools.partial(_store, cache, hp.name, device)
        yield cache
    finally:
        for hp in points:
            hp.__dict__.pop("forward", None)


# ---- forward pieces (module functions taking open_clip modules + hook points; no reference to the root) ----

def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pattern_hp: HookPoint) -> Tensor:
    """Multi-head attention core. q [B,Tq,H,d], k/v [B,Tk,H,d] -> z [B,Tq,H,d]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if _is_hooked(pattern_hp):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        z = pattern_hp(scores.softmax(dim=-1)) @ v
    else:
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return z.transpose(1, 2)


def _mha(attn: nn.MultiheadAttention, p: SimpleNamespace, x: Tensor, mask: Tensor | None) -> Tensor:
    """nn.MultiheadAttention self-attention with the fused in_proj split into per-head q/k/v."""
    B, T, D = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(B, T, 3, attn.num_heads, D // attn.num_heads)
    q, k, v = p.q(qkv[:, :, 0]), p.k(qkv[:, :, 1]), p.v(qkv[:, :, 2])
    z = p.z(_attend(q, k, v, mask, p.pattern))
    return attn.out_proj(z.reshape(B, T, D))


def _block(blk: ResidualAttentionBlock, p: SimpleNamespace, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """open_clip ResidualAttentionBlock (pre-LN, optional LayerScale), [B,T,D] -> [B,T,D]."""
    x = p.resid_pre(x)
    attn_out = p.attn_out(blk.ls_1(_mha(blk.attn, p, p.ln1(blk.ln_1(x)), mask)))
    x = p.resid_mid(x + attn_out)
    h = p.mlp_pre(blk.mlp.c_fc(p.ln2(blk.ln_2(x))))
    mlp_out = p.mlp_out(blk.ls_2(blk.mlp.c_proj(p.mlp_post(blk.mlp.gelu(h)))))
    return p.resid_post(x + mlp_out)


def _conv_bn_act(conv: nn.Module, bn: nn.Module, act: nn.Module, hp: HookPoint, x: Tensor) -> Tensor:
    return hp(act(bn(conv(x))))


def _apply(module: nn.Module, hp: HookPoint, x: Tensor) -> Tensor:
    return hp(module(x))


def _bottleneck(blk: nn.Module, p: SimpleNamespace, x: Tensor) -> Tensor:
    """open_clip Bottleneck with branch and skip exposed; the add is out of place so cached
    activations are never overwritten."""
    h = p.act1(blk.act1(blk.bn1(blk.conv1(x))))
    h = p.act2(blk.act2(blk.bn2(blk.conv2(h))))
    branch = p.branch(blk.bn3(blk.conv3(blk.avgpool(h))))
    skip = p.skip(blk.downsample(x) if blk.downsample is not None else x)
    return p.out(blk.act3(branch + skip))


def _attnpool(pool: nn.Module, p: SimpleNamespace, x: Tensor) -> Tensor:
    """open_clip AttentionPool2d, [B,C,H,W] -> [B,D_out]. Only the mean-token query reaches the
    output, so q / pattern / z cover that one query (Tq = 1): same result, 1/(HW+1) of the cost."""
    B, C = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
    heads = pool.num_heads
    q = p.q(pool.q_proj(x[:, :1]).view(B, 1, heads, C // heads))
    k = p.k(pool.k_proj(x).view(B, x.shape[1], heads, C // heads))
    v = p.v(pool.v_proj(x).view(B, x.shape[1], heads, C // heads))
    z = p.z(_attend(q, k, v, None, p.pattern))
    return p.out(pool.c_proj(z.reshape(B, C)))


def _vit_embed(vit: VisionTransformer, p: SimpleNamespace, x: Tensor) -> Tensor:
    """Patch embedding [B,N,D] -> class token + positions [B,N+1,D]."""
    x = p.input(x)
    x = p.patch_embed(vit.conv1(x).flatten(2).transpose(1, 2))
    cls = vit.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    return p.embed(torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype))


def _vit_first_block(vit: VisionTransformer, p: SimpleNamespace, bp: SimpleNamespace, x: Tensor) -> Tensor:
    return _block(vit.transformer.resblocks[0], bp, p.ln_pre(vit.ln_pre(vit.patch_dropout(x))))


def _vit_pool(vit: VisionTransformer, p: SimpleNamespace, x: Tensor) -> Tensor:
    if vit.final_ln_after_pool:
        pooled = p.ln_post(vit.ln_post(vit._global_pool(x)[0]))
    else:
        pooled = vit._global_pool(p.ln_post(vit.ln_post(x)))[0]
    return p.pooled(pooled)


def _vit_proj(vit: VisionTransformer, p: SimpleNamespace, x: Tensor) -> Tensor:
    return p.proj(x @ vit.proj if vit.proj is not None else x)


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _check_supported(clip: nn.Module) -> None:
    """Raise ValueError for open_clip variants whose forward this module does not re-implement."""
    if not isinstance(clip, open_clip.model.CLIP):
        raise ValueError(f"HookedCLIP needs an open_clip.model.CLIP, got {type(clip).__name__} "
                         "(CustomTextCLIP / CoCa / HF text towers are not supported)")
    v = clip.visual
    if isinstance(v, VisionTransformer):
        if v.attn_pool is not None:
            raise ValueError("ViT towers with attentional pooling are not supported by HookedCLIP")
    elif not isinstance(v, ModifiedResNet):
        raise ValueError(f"unsupported image tower {type(v).__name__}; HookedCLIP supports open_clip "
                         "ModifiedResNet and VisionTransformer (no timm towers)")
    blocks = list(clip.transformer.resblocks) + (list(v.transformer.resblocks) if isinstance(v, VisionTransformer) else [])
    if any(type(b) is not ResidualAttentionBlock for b in blocks):
        raise ValueError("custom attention blocks (qk_norm, scaled cosine attention, ...) are not supported by HookedCLIP")


class HookedCLIP(HookedRootModule):
    """CLIP with TransformerLens hook points on both towers (see module docstring for names).

    Build with `from_config`, `from_open_clip`, `from_checkpoint`, `from_pretrained` (open_clip
    tags, weight files, hf-hub ids) or `from_hf` (transformers CLIPModel). Inference helpers
    (`encode_image`, `encode_text`, `forward`) match open_clip's numerics to ~1e-6 in fp32.
    """

    def __init__(self, clip: open_clip.model.CLIP, cfg: dict[str, Any], model_name: str | None = None):
        """Wrap `clip` (its modules are shared, not copied). `cfg` is its open_clip-format config."""
        super().__init__()
        _check_supported(clip)
        self.cfg = cfg
        self.model_name = model_name
        self.preprocess_cfg: dict[str, Any] = {}  # open_clip PreprocessCfg fields; empty = OpenAI defaults
        # Same attribute names as open_clip.model.CLIP, hence the same state_dict keys.
        self.visual = clip.visual
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.logit_bias = clip.logit_bias
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.context_length = clip.context_length
        self.vocab_size = clip.vocab_size
        self.text_pool_type = clip.text_pool_type
        self.text_eos_id = clip.text_eos_id
        self.train(clip.training)

        table = _NameTable()
        self._stages: list[tuple[str, Callable[[Tensor], Tensor]]] = []  # image tower, point -> next point
        if isinstance(self.visual, ModifiedResNet):
            self._image_hw = (self.visual.image_size, self.visual.image_size)
            self._build_resnet_points(table)
            self._analysis = [name for name, _ in self._stages]
        else:
            self._image_hw = tuple(self.visual.image_size)
            self._build_vit_points(table)
            self._analysis = [name for name, _ in self._stages[:-1]]  # all but the projection
        self._image_out = _group(table, "", {"embed": "hook_image_embed", "normalized": "hook_image_embed_normalized"})
        self._text_points = self._build_text_points(table)
        self._text_out = _group(table, "", {"embed": "hook_text_embed", "normalized": "hook_text_embed_normalized"})
        self._stage_index = {name: i for i, (name, _) in enumerate(self._stages)}
        self._order = {name: i for i, name in enumerate(table)}
        self._table = table
        self.setup()

    # ---- construction ----

    def _build_resnet_points(self, table: _NameTable) -> None:
        v = self.visual
        p = _group(table, "visual.", {"input": "hook_input", "act1": "hook_act1", "act2": "hook_act2",
                                      "act3": "hook_act3", "avgpool": "hook_avgpool"})
        self._stages += [
            ("visual.hook_input", p.input),
            ("visual.hook_act1", functools.partial(_conv_bn_act, v.conv1, v.bn1, v.act1, p.act1)),
            ("visual.hook_act2", functools.partial(_conv_bn_act, v.conv2, v.bn2, v.act2, p.act2)),
            ("visual.hook_act3", functools.partial(_conv_bn_act, v.conv3, v.bn3, v.act3, p.act3)),
            ("visual.hook_avgpool", functools.partial(_apply, v.avgpool, p.avgpool)),
        ]
        for li in range(1, 5):
            for i, blk in enumerate(getattr(v, f"layer{li}")):
                bp = _group(table, f"visual.layer{li}.{i}.", _BOTTLENECK_POINTS)
                self._stages.append((bp.out.name, functools.partial(_bottleneck, blk, bp)))
        ap = _group(table, "visual.attnpool.", {**_HEADS_POINTS, "out": "hook_out"})
        self._stages.append((ap.out.name, functools.partial(_attnpool, v.attnpool, ap)))

    def _build_vit_points(self, table: _NameTable) -> None:
        v = self.visual
        p = _group(table, "visual.", {"input": "hook_input", "patch_embed": "hook_patch_embed",
                                      "embed": "hook_embed", "ln_pre": "ln_pre.hook_normalized"})
        self._stages.append(("visual.hook_embed", functools.partial(_vit_embed, v, p)))
        for i, blk in enumerate(v.transformer.resblocks):
            bp = _group(table, f"visual.blocks.{i}.", _BLOCK_POINTS)
            fn = functools.partial(_vit_first_block, v, p, bp) if i == 0 else functools.partial(_block, blk, bp)
            self._stages.append((bp.resid_post.name, fn))
        post = _group(table, "visual.", {"ln_post": "ln_post.hook_normalized", "pooled": "hook_pooled",
                                         "proj": "hook_proj"})
        self._stages += [("visual.hook_pooled", functools.partial(_vit_pool, v, post)),
                         ("visual.hook_proj", functools.partial(_vit_proj, v, post))]

    def _build_text_points(self, table: _NameTable) -> SimpleNamespace:
        p = _group(table, "text.", {"embed": "hook_embed"})
        p.blocks = [_group(table, f"text.blocks.{i}.", _BLOCK_POINTS) for i in range(len(self.transformer.resblocks))]
        tail = _group(table, "text.", {"ln_final": "ln_final.hook_normalized", "pooled": "hook_pooled",
                                       "proj": "hook_proj"})
        p.__dict__.update(tail.__dict__)
        return p

    def setup(self) -> None:
        """Index the hook points by name (TransformerLens calls this after building the model)."""
        self.mod_dict = self._table
        self.hook_dict = self._table

    @classmethod
    def from_config(cls, name_or_cfg: str | dict) -> "HookedCLIP":
        """Random-init model for an open_clip config name, a clipmech preset ("tiny-rn", "tiny-vit")
        or an open_clip-format dict. Seed with torch.manual_seed. Returned in eval mode."""
        name, cfg = resolve_config(name_or_cfg)
        return cls(create_open_clip(cfg), cfg, name)

    @classmethod
    def from_open_clip(cls, model: open_clip.model.CLIP, model_name: str | None = None,
                       cfg: dict | None = None) -> "HookedCLIP":
        """Wrap an existing open_clip CLIP, sharing its parameters (no copy). `cfg` (open_clip
        format) defaults to `model_name`'s config, else one reconstructed from the modules."""
        if cfg is None:
            cfg = resolve_config(model_name)[1] if model_name is not None else _config_of(model)
        return cls(model, cfg, model_name)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, model_name: str | None = None,
                        trusted: bool = False) -> "HookedCLIP":
        """Load an open_clip_train checkpoint ({"state_dict", "epoch", ...}, optional "module."
        prefix), a clipmech checkpoint (which also stores "model_cfg") or a plain state dict.
        `model_name` (preset / open_clip name) is required when the file stores no config and
        overrides a stored one. Files are unpickled with weights_only=True unless `trusted`
        (needed for files holding other Python objects, e.g. numpy RNG state in a trainer's
        latest.pt). Loads on CPU, eval mode."""
        obj = read_checkpoint(path, trusted=trusted)
        state = checkpoint_state(obj, path)
        if model_name is not None:
            name, cfg = resolve_config(model_name)
        elif isinstance(obj.get("model_cfg"), (dict, str)):  # clipmech checkpoints
            name, cfg = resolve_config(obj["model_cfg"])
            stored = obj.get("model_name", obj.get("name"))
            name = name or (stored if isinstance(stored, str) else None)
        else:
            raise ValueError(f"{path} stores no model config; pass model_name=, e.g. 'RN50' or 'tiny-rn'")
        model = cls(create_open_clip(cfg), cfg, name)
        load_state_strict(model, state, f"{path} (model {name or 'from config'})")
        return model

    @classmethod
    def from_pretrained(cls, name: str | None, pretrained: str | os.PathLike | None = None,
                        **open_clip_kwargs: Any) -> "HookedCLIP":
        """A CLIP someone else trained, through open_clip's own loader: `name` an open_clip model name
        ("RN50", "ViT-B-32"), "hf-hub:ORG/NAME" or a clipmech preset; `pretrained` a tag of that
        model ("openai", "laion2b_s34b_b79k"), a local weight file or "hf-hub:ORG/NAME".
        open_clip_kwargs go to open_clip (force_quick_gelu, force_image_size, cache_dir, ...); OpenAI
        tags get QuickGELU as they were trained. `image_transform()` then uses the weights' own
        preprocessing. Tags and hub ids download (cached by open_clip); a file never does. CPU, eval."""
        from clipmech.models.pretrained import load_open_clip

        clip, preprocess = load_open_clip(name, pretrained, **open_clip_kwargs)
        model = cls(clip, _config_of(clip), name)
        model.preprocess_cfg = preprocess
        return model

    @classmethod
    def from_hf(cls, model_or_path: Any) -> "HookedCLIP":
        """A transformers CLIPModel (ViT towers) as a HookedCLIP with a copy of its weights:
        `model_or_path` a CLIPModel, a folder saved with save_pretrained, or a hub id (downloaded by
        transformers). Embeddings match get_image_features / get_text_features to ~1e-6 (fp32).
        Tokens: `tokenize` is open_clip's BPE tokenizer, the vocabulary of OpenAI's CLIP and of
        transformers' CLIPTokenizer (same ids; padding differs, which the causal mask hides). A
        CLIPModel with another vocabulary needs its own tokenizer: pass its ids, padded to
        `context_length`, to encode_text. Needs the `hf` extra (transformers). CPU, eval mode."""
        try:
            from transformers import CLIPModel
        except ImportError as err:
            raise ImportError("HookedCLIP.from_hf needs transformers: pip install -e '.[hf]'") from err
        from clipmech.models.pretrained import open_clip_from_hf

        hf = model_or_path if isinstance(model_or_path, nn.Module) else CLIPModel.from_pretrained(str(model_or_path))
        clip, cfg = open_clip_from_hf(hf)
        name = f"hf:{model_or_path}" if not isinstance(model_or_path, nn.Module) else "hf"
        return cls(clip, cfg, name)

    def to_open_clip(self) -> open_clip.model.CLIP:
        """A fresh open_clip CLIP with a copy of these weights (same device, dtype, train/eval mode)."""
        clip = create_open_clip(self.cfg)
        ref = next(self.parameters())
        clip.to(device=ref.device, dtype=ref.dtype)
        clip.load_state_dict(self.state_dict())
        return clip.train(self.training)

    def save_checkpoint(self, path: str | os.PathLike, epoch: int = 0) -> Path:
        """Write these weights as a run checkpoint {"epoch", "name", "state_dict", "model_cfg"} (the
        trainer's format, which `from_checkpoint` and every RUN_DIR command read), atomically."""
        payload = {"epoch": epoch, "name": self.model_name or "custom", "state_dict": self.to_open_clip().state_dict(),
                   "model_cfg": self.cfg}
        atomic_torch_save(payload, path)
        return Path(path)

    # ---- properties and names ----

    @property
    def image_size(self) -> int:
        """Input side length in pixels (square inputs)."""
        return self._image_hw[0]

    def image_transform(self, is_train: bool = False) -> Callable:
        """open_clip's preprocessing (resize, centre crop, normalisation) for this image size; the
        mean / std / interpolation of the pretrained weights (`preprocess_cfg`), else OpenAI's."""
        cfg = self.preprocess_cfg
        return open_clip.image_transform(self._image_hw, is_train=is_train, mean=cfg.get("mean"), std=cfg.get("std"),
                                         interpolation=cfg.get("interpolation"), resize_mode=cfg.get("resize_mode"))

    def hook_names(self, tower: str | None = None) -> list[str]:
        """All hook-point names in forward order; tower "visual" or "text" selects one tower."""
        if tower is None:
            return list(self._table)
        if tower not in ("visual", "text"):
            raise unknown_name_error("tower", tower, ["visual", "text"])
        return [n for n in self._table if n.startswith(tower + ".")]

    def analysis_points(self) -> list[str]:
        """Ordered layer-level image points for layer-wise analyses (RN50: the paper's 22)."""
        return list(self._analysis)

    # ---- encoding ----

    def _check_image(self, image: Tensor) -> None:
        H, W = self._image_hw
        if not isinstance(image, Tensor) or image.ndim != 4 or tuple(image.shape[1:]) != (3, H, W):
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image batch must have shape [B, 3, {H}, {W}] for this model, got {got}; "
                             "preprocess with model.image_transform()")

    def _check_text(self, text: Tensor) -> None:
        if (not isinstance(text, Tensor) or text.ndim != 2 or text.shape[1] != self.context_length
                or text.dtype.is_floating_point):
            got = (f"{tuple(text.shape)} {text.dtype}") if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"text must be integer tokens of shape [B, {self.context_length}], got {got}; "
                             "use model.tokenize(list_of_strings)")
        if text.numel() and not text.is_meta and (int(text.min()) < 0 or int(text.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}) for this model, got "
                             f"[{int(text.min())}, {int(text.max())}]; use model.tokenize(list_of_strings)")

    def _run_stages(self, x: Tensor, start: int = 0) -> Tensor:
        for _, stage in self._stages[start:]:
            x = stage(x)
        return x

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """images [B,3,H,W] -> embeddings [B,D] (L2-normalised if `normalize`). One image-tower pass."""
        self._check_image(image)
        x = self._image_out.embed(self._run_stages(image))
        return self._image_out.normalized(F.normalize(x, dim=-1)) if normalize else x

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """tokens [B,context_length] -> embeddings [B,D] (L2-normalised if `normalize`)."""
        self._check_text(text)
        p = self._text_points
        cast = self.transformer.get_cast_dtype()
        x = p.embed(self.token_embedding(text).to(cast) + self.positional_embedding.to(cast))
        for blk, bp in zip(self.transformer.resblocks, p.blocks):
            x = _block(blk, bp, x, self.attn_mask.to(x.dtype) if self.attn_mask is not None else None)
        x = p.ln_final(self.ln_final(x))
        x = p.pooled(text_global_pool(x, text, self.text_pool_type, eos_token_id=self.text_eos_id))
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        x = self._text_out.embed(p.proj(x))
        return self._text_out.normalized(F.normalize(x, dim=-1)) if normalize else x

    def forward(self, image: Tensor | None = None, text: Tensor | None = None, stop_at: str | None = None):
        """open_clip's forward: (image_features, text_features, logit_scale.exp()[, logit_bias]),
        features L2-normalised, None for a tower not given. With `stop_at=NAME` the forward ends
        when that hook point fires and returns its value (after its hooks)."""
        if image is None and text is None:
            raise ValueError("pass image=, text= or both")
        if stop_at is not None:
            return self._run_until(stop_at, lambda: self.forward(image, text))
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        out = (img, txt, self.logit_scale.exp())
        return out + (self.logit_bias,) if self.logit_bias is not None else out

    def forward_from(self, point: str, activation: Tensor, stop_at: str | None = None) -> Tensor:
        """Run the image tower from analysis point `point` onward, `activation` standing in for that
        point's value (its own hooks do not fire; later ones do). Returns the value at `stop_at`
        (any later hook point) or, if None, the unnormalised image embedding [B,D]. Differentiable
        w.r.t. `activation`; costs only the segment actually run."""
        if point not in self._stage_index:
            raise unknown_name_error("analysis point", point, self._stage_index)
        start = self._stage_index[point] + 1
        if stop_at is None:
            return self._image_out.embed(self._run_stages(activation, start))
        if self._order[self._table[stop_at].name] <= self._order[point]:
            raise ValueError(f"stop_at {stop_at!r} does not come after {point!r} in the image tower")
        return self._run_until(stop_at, lambda: self._image_out.embed(self._run_stages(activation, start)),
                               "forward_from runs the image tower only")

    def _run_until(self, name: str, run: Callable[[], Any],
                   not_reached: str = "its tower's input was not given") -> Tensor:
        """Call `run` and return the value of hook point `name` when it fires (after its other
        hooks); the stop hook is removed on every exit path."""
        def stop(tensor: Tensor, hook: HookPoint) -> None:
            raise _Stop(tensor)

        hp = self._table[name]
        handle = hp.add_hook(stop)
        try:
            run()
        except _Stop as s:
            return s.value
        finally:
            handle.hook.remove()
            hp.fwd_hooks = [h for h in hp.fwd_hooks if h is not handle]
        raise ValueError(f"stop_at point {name!r} was not reached: {not_reached}")

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Strings -> LongTensor [N, context_length] on the model's device (open_clip BPE; long
        texts are truncated, keeping the end-of-text token)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return _tokenizer(self.context_length)(texts).to(self.logit_scale.device)

    @torch.no_grad()
    def zero_shot_head(self, classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]],
                       batch_size: int = 256) -> Tensor:
        """Class-embedding matrix [K,D]: per class the mean of L2-normalised template embeddings,
        renormalised. Templates are format strings with "{}" or callables. Costs K*T text passes."""
        if not classnames or not templates:
            raise ValueError("zero_shot_head needs at least one class name and one template")
        texts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]
        emb = torch.cat([self.encode_text(self.tokenize(texts[i:i + batch_size]), normalize=True)
                         for i in range(0, len(texts), batch_size)])
        return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)

    # ---- TransformerLens entry points, with name checking ----

    def __getattr__(self, name: str) -> Any:
        if name in MODEL_LANGUAGE_MODEL_ONLY:
            raise language_model_only("HookedCLIP", name)
        return super().__getattr__(name)

    def _check_names(self, names: Iterable[str | Callable]) -> None:
        for n in names:
            if isinstance(n, str):
                self._table[n]  # raises KeyError with close names

    def run_with_cache(self, *args: Any, names_filter: NamesFilter = None, stop_at: str | None = None,
                       device: str | torch.device | None = None, remove_batch_dim: bool = False,
                       return_cache_object: bool = True, **kwargs: Any) -> tuple[Any, ClipActivationCache]:
        """(output, cache) for forward(image=, text=, stop_at=): `cache` a `ClipActivationCache`
        {hook name: activation}, forward order, of the hook points selected by `names_filter` (None
        = all, a name, a list of names or a predicate), each moved to `device` as it is produced;
        `remove_batch_dim` (a batch of one) drops the batch axis; `return_cache_object=False` gives
        a plain dict. Points without hooks are cached on a fast path that costs about a plain
        forward; points carrying hooks are cached after their hooks ran. Memory: the cached
        tensors; filter to what you need."""
        if kwargs.pop("incl_bwd", False):
            raise ValueError("incl_bwd needs a scalar model output; use run_with_hooks(bwd_hooks=..., "
                             "reset_hooks_end=False), call backward on your metric, then model.reset_hooks()")
        unsupported = sorted(set(kwargs) - {"image", "text"})
        if unsupported:
            hint = (" (pos_slice indexes a language model's token positions; index the cached tensors instead)"
                    if "pos_slice" in unsupported else "")
            raise ValueError(f"run_with_cache got unsupported keyword(s) {unsupported}{hint}; supported: image, "
                             "text, names_filter, stop_at, device, remove_batch_dim, return_cache_object")
        inputs = [x for x in (*args[:2], kwargs.get("image"), kwargs.get("text")) if isinstance(x, Tensor)]
        if remove_batch_dim and any(len(x) != 1 for x in inputs):
            raise ValueError(f"remove_batch_dim needs a batch of 1, got {[len(x) for x in inputs]}; run the batch "
                             "and index the cache (cache[i]) instead")
        selected = self._selected(names_filter)
        # Points that already carry hooks keep TransformerLens' caching hook, so their cached value is
        # the one after those hooks ran; the others are cached on the fast path.
        hooked = [hp.name for hp in selected if _is_hooked(hp)]
        device = torch.device(device) if device is not None else None
        found: dict[str, Tensor] = {}
        with _fast_cache([hp for hp in selected if hp.name not in hooked], found, device):
            if hooked:
                out, slow = super().run_with_cache(*args, names_filter=hooked, stop_at=stop_at, device=device,
                                                   **kwargs)
                found.update(slow)
            else:
                out = self(*args, stop_at=stop_at, **kwargs)
        cache = ClipActivationCache((name, found[name]) for name in self._table if name in found)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, cache if return_cache_object else dict(cache)

    def _selected(self, names_filter: NamesFilter) -> list[HookPoint]:
        """The hook points `names_filter` selects (names are checked: a typo raises KeyError)."""
        if names_filter is None:
            return list(self._table.values())
        if isinstance(names_filter, str):
            return [self._table[names_filter]]
        if isinstance(names_filter, (list, tuple)):
            self._check_names(names_filter)
            wanted = set(names_filter)
            return [hp for name, hp in self._table.items() if name in wanted]
        return [hp for name, hp in self._table.items() if names_filter(name)]

    def run_with_hooks(self, *args: Any, fwd_hooks: list = [], bwd_hooks: list = [], **kwargs: Any) -> Any:
        """forward(...) with temporary hooks [(name_or_predicate, fn(tensor, hook) -> tensor|None)];
        they are removed afterwards, also when the forward raises."""
        self._check_names(n for n, _ in list(fwd_hooks) + list(bwd_hooks))
        return super().run_with_hooks(*args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kwargs)


def _stack_cfg(transformer: nn.Module) -> dict[str, Any]:
    """width / layers / heads / mlp_ratio / ls_init_value of an open_clip Transformer."""
    blk = transformer.resblocks[0]
    cfg = {"width": transformer.width, "layers": transformer.layers, "heads": blk.attn.num_heads,
           "mlp_ratio": blk.mlp.c_fc.out_features / transformer.width}
    if isinstance(blk.ls_1, LayerScale):  # any value: the weights are loaded afterwards
        cfg["ls_init_value"] = blk.ls_1.gamma.flatten()[0].item()
    return cfg


def _config_of(model: open_clip.model.CLIP) -> dict[str, Any]:
    """Reconstruct the open_clip-format config of a built (supported) CLIP, for to_open_clip."""
    _check_supported(model)
    v = model.visual
    text_cfg = {"context_length": model.context_length, "vocab_size": model.vocab_size,
                **_stack_cfg(model.transformer), "pool_type": model.text_pool_type}
    if model.text_eos_id is not None:
        text_cfg["eos_id"] = model.text_eos_id
    if model.attn_mask is None:
        text_cfg["no_causal_mask"] = True
    if isinstance(model.text_projection, nn.Linear):
        text_cfg["proj_bias"] = model.text_projection.bias is not None
    elif model.text_projection is None:
        text_cfg["proj_type"] = "none"
    if isinstance(v, ModifiedResNet):
        width = v.conv3.out_channels
        vision_cfg = {"image_size": v.image_size, "layers": [len(getattr(v, f"layer{i}")) for i in range(1, 5)],
                      "width": width, "head_width": width * 32 // v.attnpool.num_heads}
    else:
        stack = _stack_cfg(v.transformer)
        heads = stack.pop("heads")  # vision configs give head_width instead
        vision_cfg = {**stack, "head_width": stack["width"] // heads, "image_size": v.image_size[0],
                      "patch_size": v.patch_size[0], "no_ln_pre": isinstance(v.ln_pre, nn.Identity),
                      "pool_type": v.pool_type, "final_ln_after_pool": v.final_ln_after_pool}
    cfg = {"embed_dim": v.output_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU):
        cfg["quick_gelu"] = True
    return cfg
