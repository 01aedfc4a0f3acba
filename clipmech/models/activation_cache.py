"""`ClipActivationCache`: what `HookedCLIP.run_with_cache` returns, a dict {hook name: activation}
in forward order with the batch-level operations a notebook needs.

A dict subclass rather than TransformerLens's `ActivationCache`: that class's analysis methods
(accumulated_resid, decompose_resid, logit_attrs, ...) read a language model's residual stream,
layer norms and unembedding, which CLIP's image tower does not have; here they raise an error
that says so instead of failing deep inside. Every activation is batch-first (see
`clipmech.models.hooked_clip` for the layouts), so slicing the batch is one rule for all points.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from clipmech.utils import unknown_name_error

# ActivationCache / HookedTransformer methods that assume a language model.
LANGUAGE_MODEL_ONLY = frozenset({
    "accumulated_resid", "decompose_resid", "logit_attrs", "apply_ln_to_stack", "get_full_resid_decomposition",
    "stack_head_results", "stack_neuron_results", "compute_head_results", "get_neuron_results", "logit_lens",
    "compute_ssm_effective_attention", "compute_ssm_state", "ssm_layers", "toggle_autodiff",
})
# HookedTransformer attributes that assume a language model (tokens in, vocabulary logits out).
MODEL_LANGUAGE_MODEL_ONLY = frozenset({
    "to_tokens", "to_string", "to_str_tokens", "to_single_token", "get_token_position", "generate", "tokenizer",
    "W_U", "b_U", "W_E", "W_pos", "unembed", "loss_fn", "accumulated_bias", "all_composition_scores",
})


def language_model_only(owner: str, name: str) -> AttributeError:
    """The error for a TransformerLens helper that needs a language model."""
    return AttributeError(
        f"{owner}.{name} is a TransformerLens helper for language models (token strings, residual stream, layer "
        "norm scales, unembedding); CLIP has none of these. Use HookedCLIP.tokenize / encode_text for text, the "
        "cached tensors with ClipActivationCache.stack / stack_activation, or clipmech.analysis.attribution / "
        "patching for attributions")


class ClipActivationCache(dict):
    """{hook name: Tensor} of one `run_with_cache`, in forward order; batch-first tensors unless
    `has_batch_dim` is False (after `remove_batch_dim` or an integer index).

    - `cache[name]`: the activation (an unknown name raises KeyError with the closest cached names);
      `cache[i]`, `cache[a:b]`, `cache[index_tensor]`: a new cache with the batch indexed.
    - `to(device, dtype)`, `remove_batch_dim()`, `apply_slice_to_batch_dim(index)`: new caches.
    - `stack(names)`, `stack_activation(suffix, tower)`: one tensor [n_points, ...].
    Memory: the cached tensors (views share storage with the originals).
    """

    def __init__(self, data: Any = (), has_batch_dim: bool = True):
        super().__init__(data)
        self.has_batch_dim = has_batch_dim

    def __missing__(self, key: str) -> Tensor:
        raise unknown_name_error("cached hook point", key, self.keys())

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.apply_slice_to_batch_dim(key)

    def __getattr__(self, name: str) -> Any:
        if name in LANGUAGE_MODEL_ONLY:
            raise language_model_only("ClipActivationCache", name)
        raise AttributeError(f"'ClipActivationCache' object has no attribute {name!r}")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.items())[:3])
        more = f", ... (+{len(self) - 3} more)" if len(self) > 3 else ""
        return f"ClipActivationCache({len(self)} points: {shapes}{more})"

    def batch_size(self) -> int:
        """The batch size shared by every cached tensor."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension (remove_batch_dim or an integer index made it)")
        sizes = {len(v) for v in self.values()}
        if len(sizes) > 1:
            raise ValueError(f"cached tensors have different batch sizes {sorted(sizes)}")
        return sizes.pop() if sizes else 0

    def apply_slice_to_batch_dim(self, index: int | slice | Sequence[int] | Tensor) -> "ClipActivationCache":
        """A cache with every tensor indexed along the batch: an int drops the batch dimension (as
        tensor indexing does), a slice, list or index tensor keeps it."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension left to slice")
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        n = self.batch_size()
        if isinstance(index, int) and not -n <= index < n:
            raise IndexError(f"batch index {index} out of range for a batch of {n}")
        return ClipActivationCache({k: v[index] for k, v in self.items()}, has_batch_dim=not isinstance(index, int))

    def remove_batch_dim(self) -> "ClipActivationCache":
        """The cache of a one-image batch without its batch dimension ([1, ...] -> [...])."""
        n = self.batch_size()
        if n != 1:
            raise ValueError(f"remove_batch_dim needs a batch of 1, this cache holds {n}; index one image "
                             "with cache[i] instead")
        return self.apply_slice_to_batch_dim(0)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ClipActivationCache":
        """A cache with every tensor moved to `device` and/or cast to `dtype` (floating tensors only)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return ClipActivationCache({k: move(v) for k, v in self.items()}, has_batch_dim=self.has_batch_dim)

    def stack(self, names: Iterable[str]) -> Tensor:
        """Tensor [len(names), ...]: the activations of `names` stacked in the given order; they must
        have one shape (e.g. the residual stream of every ViT block, not conv maps of two stages)."""
        names = list(names)
        if not names:
            raise ValueError("stack needs at least one cached hook point")
        tensors = [self[n] for n in names]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            listed = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(names, tensors))
            raise ValueError(f"cannot stack points of different shapes ({listed}); stack points of one shape, "
                             "e.g. the blocks of one ResNet stage")
        return torch.stack(tensors)

    def block_names(self, suffix: str, tower: str = "visual") -> list[str]:
        """Cached per-block points '<tower>.blocks.<i>.<suffix>' (ViT / text) or
        'visual.layer<L>.<i>.<suffix>' (ResNet), in forward order."""
        if tower not in ("visual", "text"):
            raise unknown_name_error("tower", tower, ["visual", "text"])
        names = []
        for n in self:
            parts = n.split(".")
            if (n.startswith(tower + ".") and n.endswith("." + suffix) and len(parts) > 3 and parts[2].isdigit()
                    and (parts[1] == "blocks" or parts[1].startswith("layer"))):
                names.append(n)
        return names

    def stack_activation(self, suffix: str, tower: str = "visual",
                         return_labels: bool = False) -> Tensor | tuple[Tensor, list[str]]:
        """Tensor [n_blocks, ...] of the per-block point `suffix` (e.g. 'hook_resid_post',
        'attn.hook_pattern', 'hook_out') of every cached block of `tower`, in forward order; with
        `return_labels` also the names. ResNet stages differ in shape: stack one stage with `stack`."""
        names = self.block_names(suffix, tower)
        if not names:
            raise KeyError(f"no cached per-block point ending in {suffix!r} in the {tower} tower; cache them "
                           f"with names_filter=lambda n: n.endswith({suffix!r})")
        stacked = self.stack(names)
        return (stacked, names) if return_labels else stacked
