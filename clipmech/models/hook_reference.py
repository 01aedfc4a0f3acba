"""The hook-point reference (docs/hooks.md): every hook point of a `HookedCLIP`, its shape and what it
is, generated from the models themselves so it cannot drift from the code.

`python -m clipmech.models.hook_reference docs/hooks.md` rewrites the file; `--check` compares
instead (what tests/test_hook_reference.py does). The models are built with random weights (no
download): RN50 and ViT-B-32 from open_clip's configs and the tiny presets on the meta device
(shapes without weights), and a transformers CLIPModel of a tiny random config
(`HookedCLIP.from_hf`). Cost: about 2 s.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from clipmech.models.hooked_clip import HookedCLIP
from clipmech.utils import atomic_write_text

# (pattern on the name with block indices written {i} / layer{L}, meaning), first match wins.
MEANINGS: list[tuple[str, str]] = [
    (r"visual\.hook_input", "pixels after preprocessing (the image tower's input)"),
    (r"visual\.hook_act([123])", "ResNet stem: conv {0} -> batch norm -> ReLU"),
    (r"visual\.hook_avgpool", "ResNet stem: 2x2 average pool, the input of layer1"),
    (r"visual\.layer\{L\}\.\{i\}\.hook_act1", "bottleneck: 1x1 conv -> BN -> ReLU"),
    (r"visual\.layer\{L\}\.\{i\}\.hook_act2", "bottleneck: 3x3 conv -> BN -> ReLU"),
    (r"visual\.layer\{L\}\.\{i\}\.hook_branch", "bottleneck: residual branch (avgpool, 1x1 conv, BN) before the add"),
    (r"visual\.layer\{L\}\.\{i\}\.hook_skip", "bottleneck: skip path (identity or avgpool-conv-BN downsample)"),
    (r"visual\.layer\{L\}\.\{i\}\.hook_out", "bottleneck output ReLU(branch + skip); a circuit point"),
    (r"visual\.attnpool\.hook_q", "attention pooling: query of the mean token, per head (Tq = 1)"),
    (r"visual\.attnpool\.hook_k", "attention pooling: keys of the mean token and every position, per head"),
    (r"visual\.attnpool\.hook_v", "attention pooling: values, per head"),
    (r"visual\.attnpool\.hook_pattern", "attention pooling: softmax attention of the mean-token query"),
    (r"visual\.attnpool\.hook_z", "attention pooling: attention-weighted values, per head"),
    (r"visual\.attnpool\.hook_out", "attention pooling output after c_proj: the image features"),
    (r"visual\.hook_patch_embed", "patch embeddings (conv1 over patches, flattened)"),
    (r"visual\.hook_embed", "class token + patch embeddings + positional embedding"),
    (r"visual\.ln_pre\.hook_normalized", "after ln_pre: the residual stream entering block 0"),
    (r"(visual|text)\.blocks\.\{i\}\.hook_resid_pre", "residual stream entering the block"),
    (r"(visual|text)\.blocks\.\{i\}\.ln1\.hook_normalized", "ln_1 output, the attention's input"),
    (r"(visual|text)\.blocks\.\{i\}\.attn\.hook_q", "queries, per head"),
    (r"(visual|text)\.blocks\.\{i\}\.attn\.hook_k", "keys, per head"),
    (r"(visual|text)\.blocks\.\{i\}\.attn\.hook_v", "values, per head"),
    (r"visual\.blocks\.\{i\}\.attn\.hook_pattern",
     "softmax attention pattern (materialised only when hooked or cached)"),
    (r"text\.blocks\.\{i\}\.attn\.hook_pattern",
     "causal softmax attention pattern (materialised only when hooked or cached)"),
    (r"visual\.blocks\.\{i\}\.attn\.hook_z", "attention-weighted values, per head (heads as circuit nodes)"),
    (r"text\.blocks\.\{i\}\.attn\.hook_z", "attention-weighted values, per head"),
    (r"(visual|text)\.blocks\.\{i\}\.hook_attn_out", "attention output after out_proj (and LayerScale)"),
    (r"(visual|text)\.blocks\.\{i\}\.hook_resid_mid", "residual stream after the attention"),
    (r"(visual|text)\.blocks\.\{i\}\.ln2\.hook_normalized", "ln_2 output, the MLP's input"),
    (r"(visual|text)\.blocks\.\{i\}\.mlp\.hook_pre", "MLP hidden layer before the activation"),
    (r"visual\.blocks\.\{i\}\.mlp\.hook_post", "MLP neurons after the activation (neurons as circuit nodes)"),
    (r"text\.blocks\.\{i\}\.mlp\.hook_post", "MLP neurons after the activation"),
    (r"(visual|text)\.blocks\.\{i\}\.hook_mlp_out", "MLP output after c_proj (and LayerScale)"),
    (r"visual\.blocks\.\{i\}\.hook_resid_post", "residual stream leaving the block; a circuit point"),
    (r"text\.blocks\.\{i\}\.hook_resid_post", "residual stream leaving the block"),
    (r"visual\.ln_post\.hook_normalized", "after ln_post (of the pooled token, or of all tokens before pooling)"),
    (r"visual\.hook_pooled", "pooled token (class token or mean, as configured)"),
    (r"visual\.hook_proj", "projection into the joint embedding space"),
    (r"text\.hook_embed", "token embedding + positional embedding"),
    (r"text\.ln_final\.hook_normalized", "after the final layer norm, every token"),
    (r"text\.hook_pooled", "pooled text feature (the end-of-text token, as configured)"),
    (r"text\.hook_proj", "projection into the joint embedding space"),
    (r"hook_image_embed", "image embedding, unnormalised (the metrics' input)"),
    (r"hook_image_embed_normalized", "image embedding, L2-normalised (forward's image output)"),
    (r"hook_text_embed", "text embedding, unnormalised"),
    (r"hook_text_embed_normalized", "text embedding, L2-normalised (forward's text output)"),
]
LAYOUTS = ("Shapes at batch B: conv maps [B, C, H, W]; token streams [B, T, D]; per-head q / k / v / z "
           "[B, T, H, d_head]; attention patterns [B, H, T_query, T_key]; vectors [B, D]. Nodes of a point "
           "(circuits, patching) lie on the channel axis of conv maps, the head axis of per-head tensors and "
           "the last axis otherwise.")


def template(name: str) -> str:
    """The name with its block index written '{i}' (and a ResNet stage 'layer{L}')."""
    name = re.sub(r"\.blocks\.\d+\.", ".blocks.{i}.", name)
    return re.sub(r"\.layer\d+\.\d+\.", ".layer{L}.{i}.", name)


def meaning(name: str) -> str:
    """What the hook point `name` is (KeyError for a name the reference does not describe)."""
    t = template(name)
    for pattern, text in MEANINGS:
        m = re.fullmatch(pattern, t)
        if m:
            return text.format(*m.groups())
    raise KeyError(f"hook point {name!r} has no entry in clipmech.models.hook_reference.MEANINGS; add one")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(["B", *map(str, t.shape[1:])]) + "]"


def hook_rows(model: HookedCLIP) -> list[tuple[str, str, str]]:
    """[(name, shape, meaning)] for every hook point in forward order; consecutive blocks of one
    stack whose points have the same shapes are listed once with their index range, e.g.
    'visual.blocks.{0..11}.hook_resid_post'. Cost: one forward of both towers at batch 1 (none on
    a model on the meta device, which gives the shapes without computing anything)."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, model.image_size, model.image_size, device=device)
    text = torch.zeros(1, model.context_length, dtype=torch.long, device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(image=images, text=text)
    # units: [stack prefix or None, [block indices], [(suffix or full name, shape, meaning)]]
    units: list[list] = []
    for name, act in cache.items():
        m = re.fullmatch(r"(.*\.(?:blocks|layer\d+))\.(\d+)\.(.*)", name)
        row = (m.group(3) if m else name, _shape(act), meaning(name))
        if m and units and units[-1][0] == m.group(1) and units[-1][1][-1] == m.group(2):
            units[-1][2].append(row)
        elif m:
            units.append([m.group(1), [m.group(2)], [row]])
        else:
            units.append([None, [], [row]])
    merged: list[list] = []
    for unit in units:
        prev = merged[-1] if merged else None
        if unit[0] is not None and prev is not None and prev[0] == unit[0] and prev[2] == unit[2]:
            prev[1] += unit[1]
        else:
            merged.append(unit)
    out = []
    for prefix, idx, rows in merged:
        span = "" if not idx else idx[0] if len(idx) == 1 else f"{{{idx[0]}..{idx[-1]}}}"
        out += [(f"{prefix}.{span}.{suffix}" if prefix else suffix, shape, text) for suffix, shape, text in rows]
    return out


def render(models: dict[str, Callable[[], HookedCLIP]]) -> str:
    """docs/hooks.md: one section per model (title -> builder), a table of its hook points."""
    lines = ["# Hook points of HookedCLIP", "",
             "Generated by `python -m clipmech.models.hook_reference docs/hooks.md` from models built with "
             "random weights; `tests/test_hook_reference.py` fails when it is out of date. Names are "
             "TransformerLens-style (`model.hook_names()`, `run_with_cache`, `run_with_hooks`); a range "
             "`{0..11}` stands for one point per block. `model.analysis_points()` are the layer-level "
             "image points the analyses use.", "", LAYOUTS, ""]
    for title, build in models.items():
        model = build()
        rows = hook_rows(model)
        lines += [f"## {title}", "",
                  f"{len(model.hook_names())} hook points, {len(model.analysis_points())} analysis points "
                  f"(first {model.analysis_points()[0]}, last {model.analysis_points()[-1]}); input "
                  f"{model.image_size} px, {model.context_length} text tokens.", "",
                  "| hook point | shape | what it is |", "| --- | --- | --- |"]
        lines += [f"| `{name}` | {shape} | {text} |" for name, shape, text in rows]
        lines.append("")
    return "\n".join(lines)


def _tiny_hf() -> HookedCLIP:
    """A transformers CLIPModel of a tiny random config (ViT towers), converted by from_hf."""
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8),
        projection_dim=24)
    return HookedCLIP.from_hf(transformers.CLIPModel(cfg).eval())


def _on_meta(name: str) -> HookedCLIP:
    """The model of config `name` on the meta device: shapes without weights or compute."""
    with torch.device("meta"):
        return HookedCLIP.from_config(name)


REFERENCE_MODELS: dict[str, Callable[[], HookedCLIP]] = {
    "RN50 (open_clip config, the paper's model)": lambda: _on_meta("RN50"),
    "ViT-B-32 (open_clip config)": lambda: _on_meta("ViT-B-32"),
    "tiny-rn (clipmech preset, tests and the quickstart)": lambda: _on_meta("tiny-rn"),
    "tiny-vit (clipmech preset)": lambda: _on_meta("tiny-vit"),
    "Hugging Face CLIPModel (tiny random config, via HookedCLIP.from_hf)": _tiny_hf,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or check the hook-point reference (docs/hooks.md).")
    parser.add_argument("path", nargs="?", default="docs/hooks.md", help="the Markdown file (default: docs/hooks.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated text")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    text = render(REFERENCE_MODELS)
    path = Path(args.path)
    if args.check:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date; regenerate: python -m clipmech.models.hook_reference {path}")
            return 1
        return 0
    atomic_write_text(text, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
