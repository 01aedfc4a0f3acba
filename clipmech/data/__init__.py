"""Domain x class datasets (DomainNet, embedded emoji domains), the paper's mixtures, captions, TSVs.

    from clipmech.data import load_dataset, build_mixture
    ds = load_dataset("emoji")                       # or a DomainNet root folder
    mix = build_mixture(ds, "cg_high", test_domain="quickdraw")
    mix.to_tsv("out/" + mix.filename())
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipmech.data.dataset import DomainDataset

EMBEDDED = ("emoji",)


def __getattr__(name: str) -> Any:
    # Lazy re-exports (PEP 562): `clipmech --help` imports this package for its CLI module and must not
    # pull in numpy and PIL (and through them torch) before a command needs them.
    if name == "make_captions":
        from clipmech.data.captions import make_captions
        return make_captions
    if name == "DomainDataset":
        from clipmech.data.dataset import DomainDataset
        return DomainDataset
    if name in ("DomainNet", "SkippedSamplesWarning"):
        from clipmech.data import domainnet
        return getattr(domainnet, name)
    if name in ("SETUPS", "Mixture", "build_mixture"):
        from clipmech.data import mixtures
        return getattr(mixtures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(name_or_root: str | Path, verify: str = "none", **kwargs) -> "DomainDataset":
    """'emoji' -> the embedded dataset (offline; in memory, so `verify` has nothing to check);
    otherwise a DomainNet root folder whose files are checked as `verify` says (none | header |
    decode, see DomainNet); kwargs go to the loader."""
    if str(name_or_root) == "emoji":
        from clipmech.data.emoji import load_emoji
        return load_emoji(**kwargs)
    root = Path(name_or_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name_or_root!r} is neither an embedded dataset {EMBEDDED} nor a folder; "
                                "pass 'emoji' or a DomainNet root (ROOT/{domain}/{class}/..., ROOT/{domain}_train.txt)")
    from clipmech.data.domainnet import DomainNet
    return DomainNet(root, verify=verify, **kwargs)


__all__ = ["DomainDataset", "DomainNet", "Mixture", "SETUPS", "SkippedSamplesWarning", "build_mixture", "load_dataset",
           "make_captions"]
