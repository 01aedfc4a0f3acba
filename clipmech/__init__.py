"""clipmech: mechanistic interpretability of CLIP domain and compositional generalization."""
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so `import clipmech` does not pull in torch / open_clip / transformer_lens.
    if name == "HookedCLIP":
        from clipmech.models.hooked_clip import HookedCLIP
        return HookedCLIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
