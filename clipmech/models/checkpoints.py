"""Weights in a checkpoint file to a built model: the state dict inside a loaded checkpoint, and a
strict load whose mismatch is named (missing / unexpected keys, shape mismatches) as a
CheckpointError (exit 4) instead of torch's multi-page dump. Shared by HookedCLIP.from_checkpoint and
the pretrained loader (`--pretrained FILE`), so both give the same messages."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from clipmech.errors import CheckpointError
from clipmech.utils import PathLike


def checkpoint_state(obj: Any, path: PathLike) -> dict[str, Tensor]:
    """The state dict of a loaded checkpoint: a plain state dict or the "state_dict" entry of a
    trainer checkpoint, DistributedDataParallel's "module." prefix removed. CheckpointError naming
    `path` when it holds no tensors."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(t, Tensor) for t in state.values()):
        raise CheckpointError(f"{path} is not a model checkpoint: expected a state dict or a dict with a "
                              "'state_dict' entry of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: t for k, t in state.items()}
    return state


def load_state_strict(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """load_state_dict, but a mismatch raises CheckpointError listing missing / unexpected keys and
    shape mismatches (10 of each at most); `what` names the file (and model) in the message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def fmt(label: str, items: list[str]) -> str:
            more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
            return f"\n  {label} ({len(items)}): " + ", ".join(items[:10]) + more if items else ""
        raise CheckpointError(f"checkpoint {what} does not match the architecture (another model?)"
                              + fmt("missing keys", missing) + fmt("unexpected keys", unexpected)
                              + fmt("shape mismatches", shapes))
    model.load_state_dict(state)
