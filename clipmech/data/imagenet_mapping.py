"""The paper's ImageNet-1k <-> DomainNet class mapping and ImageNet class names
(docs/methods.md#data, #mixtures, #training).

`in_to_dn_mapping.json` (shipped under data/assets/paper/, MIT, notice beside it) maps each of the 345
DomainNet class names to the ImageNet-1k class indices that depict it, or null: 182 DomainNet classes
map to 450 ImageNet classes ("shared"); 550 ImageNet classes are unmapped. It drives the ImageNet-Sketch
filter and the supervised baseline's 1345-way label merge. Class names are the OpenAI ImageNet names
as open_clip ships them (index order = sorted WordNet ids).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

PAPER_ASSETS = Path(__file__).parent / "assets" / "paper"
N_IMAGENET = 1000


@lru_cache(maxsize=1)
def imagenet_to_domainnet() -> dict[str, list[int] | None]:
    """{DomainNet class name: [ImageNet indices] or None}, the paper's mapping (345 keys)."""
    return json.loads((PAPER_ASSETS / "in_to_dn_mapping.json").read_text(encoding="utf-8"))


def imagenet_classnames() -> list[str]:
    """The 1000 OpenAI ImageNet class names (open_clip's list; index = ImageNet class id)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


def shared_imagenet_classes() -> list[int]:
    """Sorted ImageNet indices the mapping links to some DomainNet class (450)."""
    return sorted({k for ks in imagenet_to_domainnet().values() if ks for k in ks})


def in_sketch_templates() -> list[str]:
    """The paper's 21 ImageNet-Sketch caption templates ('{}' = class name), in its order."""
    return (PAPER_ASSETS / "in_sketch_templates.txt").read_text(encoding="utf-8").splitlines()


def merged_labels(domainnet_classes: list[str]) -> tuple[list[int], list[int]]:
    """The supervised baseline's label merge (docs/methods.md#training): 1000 + len(domainnet_classes) classes
    (1345 on DomainNet).

    Returns (imagenet_label, domainnet_label): ImageNet class k -> 1000 + j when the mapping links k
    to DomainNet class j (j = index in `domainnet_classes`), else k; DomainNet class j -> 1000 + j.
    Mapped DomainNet names the dataset lacks (a subset or a fixture) leave their ImageNet classes
    unmerged. Raises ValueError when an ImageNet class maps to two DomainNet classes."""
    index = {name: j for j, name in enumerate(domainnet_classes)}
    imagenet = list(range(N_IMAGENET))
    for name, ks in imagenet_to_domainnet().items():
        if not ks or name not in index:
            continue
        for k in ks:
            if imagenet[k] != k:
                raise ValueError(f"ImageNet class {k} maps to two DomainNet classes; the merge is ambiguous")
            imagenet[k] = N_IMAGENET + index[name]
    return imagenet, [N_IMAGENET + j for j in range(len(domainnet_classes))]


@lru_cache(maxsize=None)
def _wnid_folders(parent: str) -> dict[str, int]:
    folders = sorted(p.name for p in Path(parent).iterdir() if p.is_dir() and re.fullmatch(r"n\d{8}", p.name))
    if len(folders) != N_IMAGENET:
        raise ValueError(f"{parent} has {len(folders)} WordNet-id class folders, expected the {N_IMAGENET} of "
                         "ImageNet (train / val / ImageNet-Sketch layout ROOT/<wnid>/<image>); the class index "
                         "of an image is its folder's position in their sorted order")
    return {name: k for k, name in enumerate(folders)}


def imagenet_class_of_path(path: str | Path) -> int:
    """ImageNet class index (0-999) of an image in the ImageFolder layout ROOT/<wnid>/<file>: the
    position of its folder among the 1000 sorted WordNet-id folders of ROOT (listed once per ROOT)."""
    path = Path(path)
    index = _wnid_folders(str(path.parent.parent))
    if path.parent.name not in index:
        raise ValueError(f"{path}: folder {path.parent.name!r} is not an ImageNet WordNet id (n01440764 ...)")
    return index[path.parent.name]


def wnid_folders(root: str | Path, subfolder: str, what: str) -> tuple[Path, list[Path]]:
    """(folder, its 1000 WordNet-id class folders sorted = ImageNet class order) of an ImageFolder
    copy of ImageNet (val) or ImageNet-Sketch; `subfolder` is used when ROOT holds it. Raises
    FileNotFoundError / ValueError naming `what` and the folder when the layout is wrong."""
    root = Path(root)
    base = root / subfolder if (root / subfolder).is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"{what} folder {root} does not exist (expected ROOT/<wnid>/<image files>)")
    folders = sorted(p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"n\d{8}", p.name))
    if len(folders) != N_IMAGENET:
        raise ValueError(f"{base} has {len(folders)} WordNet-id class folders (n01440764 ...), expected the 1000 "
                         f"of {what}; class labels follow their sorted order, so all must be present")
    return base, folders
