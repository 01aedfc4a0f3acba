"""DomainNet loader: `ROOT/{domain}/{class}/{file}` plus `ROOT/{domain}_{train,test}.txt` lists.

Split-list lines are `domain/class/file [label]` relative to ROOT. Class names are the class folder
names with '_' -> ' '; class ids follow the case-insensitive alphabetical order of the folder names
(DomainNet's official labels 0-344; labels in the lists are checked against it). The test split
doubles as validation (docs/methods.md#data). A domain may lack classes (painting has 344).

Bad input: a missing domain folder or split list raises FileNotFoundError naming the path; a list
entry whose file is missing (and, with verify="header", a file PIL cannot identify; with
verify="decode", a file that does not fully decode, e.g. truncated) is skipped,
counted in `.skipped`, and reported once as a `SkippedSamplesWarning` with the first few paths.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from clipmech.data.dataset import VERIFY, DomainDataset, check_image

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
TRIM_ORDER = ("real", "quickdraw", "painting", "sketch", "infograph", "clipart")  # docs/methods.md#mixtures
C2_CLASSES = ["aircraft carrier", "axe", "banana", "barn", "bed", "candle", "lion", "mountain", "necklace",
              "penguin", "pizza", "saxophone", "television", "tractor", "traffic light"]  # docs/methods.md#data
_VERIFY_ALIASES = {"exists": "none", "open": "header"}  # the names of earlier versions


class SkippedSamplesWarning(UserWarning):
    """Some listed samples were skipped (missing or unreadable files)."""


def _class_folders(root: Path, domains: list[str]) -> list[str]:
    names = set()
    for d in domains:
        folder = root / d
        if not folder.is_dir():
            raise FileNotFoundError(f"DomainNet domain folder missing: {folder} (expected ROOT/{d}/<class>/<file>)")
        names.update(e.name for e in os.scandir(folder) if e.is_dir())
    if not names:
        raise FileNotFoundError(f"no class folders under {root}/{{{','.join(domains)}}}")
    return sorted(names, key=lambda n: (n.lower(), n))


def DomainNet(root: str | Path, domains: list[str] | tuple[str, ...] = DOMAINS, verify: str = "none",
              max_report: int = 5) -> DomainDataset:
    """Load a DomainNet-layout folder as a DomainDataset (sources = absolute file paths).

    verify: "none" (list entries checked against a directory listing; fast), "header" (also a PIL
    header check of every file; ~0.1 ms per file) or "decode" (every file fully decoded; catches
    truncated files). "exists" / "open" are accepted for "none" / "header". Cost: one scandir per
    class folder plus the checks.
    """
    verify = _VERIFY_ALIASES.get(verify, verify)
    if verify not in VERIFY:
        raise ValueError(f"verify={verify!r} must be one of {VERIFY}")
    root = Path(root).resolve()
    domains = sorted(domains)
    folders = _class_folders(root, domains)
    class_of = {f: i for i, f in enumerate(folders)}
    dom, cls, split, sources, skipped = [], [], [], [], []
    prefix = str(root) + os.sep
    for d, name in enumerate(domains):
        existing: dict[str, set[str]] = {}
        for s in ("train", "test"):
            listing = root / f"{name}_{s}.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"DomainNet split list missing: {listing} (lines 'domain/class/file [label]')")
            for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                rel = parts[0]
                pieces = rel.split("/")
                if len(pieces) != 3 or pieces[0] != name or pieces[1] not in class_of:
                    raise ValueError(f"{listing}, line {n}: {rel!r} is not '{name}/<class folder>/<file>'")
                c = class_of[pieces[1]]
                if len(parts) > 1 and parts[1].lstrip("-").isdigit() and int(parts[1]) != c:
                    raise ValueError(f"{listing}, line {n}: label {parts[1]} but class folder {pieces[1]!r} "
                                     f"has id {c} in the case-insensitive alphabetical order")
                if pieces[1] not in existing:
                    folder = root / name / pieces[1]
                    existing[pieces[1]] = {e.name for e in os.scandir(folder)} if folder.is_dir() else set()
                path = prefix + rel  # string concat: Path joins cost ~10 us per line
                reason = None if pieces[2] in existing[pieces[1]] else "missing"
                if reason is None:
                    reason = check_image(path, verify)
                if reason is not None:
                    skipped.append((path, reason))
                    continue
                dom.append(d), cls.append(c), split.append(s), sources.append(path)
    if skipped:
        first = "; ".join(f"{p} ({r})" for p, r in skipped[:max_report])
        warnings.warn(f"DomainNet {root}: skipped {len(skipped)} listed samples; first: {first}",
                      SkippedSamplesWarning, stacklevel=2)
    ds = DomainDataset(
        "domainnet", domains, [f.replace("_", " ") for f in folders], np.asarray(dom, np.int64),
        np.asarray(cls, np.int64), np.asarray(split, dtype="<U5"), sources=sources, natural_domain="real",
        default_test_domain=None, default_test_classes=[c for c in C2_CLASSES if c in {f.replace("_", " ") for f in folders}] or None,
        trim_order=[d for d in TRIM_ORDER if d in domains] + [d for d in domains if d not in TRIM_ORDER],
        root=prefix)
    ds.skipped = skipped
    return ds
