"""The paper's ImageNet-1k <-> DomainNet class mapping and ImageNet class names (paper.md §3.2, §4, §6).

`in_to_dn_mapping.json` (shipped under data/assets/paper/, MIT, notice beside it) maps each of the 345
DomainNet class names to the ImageNet-1k class indices that depict it, or null: 182 DomainNet classes
map to 450 ImageNet classes ("shared"); 550 ImageNet classes are unmapped. It drives the ImageNet-Sketch
filter and the supervised baseline's 1345-way label merge. Class names are the OpenAI ImageNet names
as open_clip ships them (index order = sorted WordNet ids).
"""
from __future__ import annotations

import json
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
    """The supervised baseline's 1345-way label merge (paper.md §6).

    Returns (imagenet_label, domainnet_label): ImageNet class k -> 1000 + j when the mapping links k
    to DomainNet class j (j = index in `domainnet_classes`), else k; DomainNet class j -> 1000 + j.
    Raises ValueError when a mapped DomainNet name is not in `domainnet_classes` or an ImageNet
    class maps to two DomainNet classes (the merge would be ambiguous)."""
    index = {name: j for j, name in enumerate(domainnet_classes)}
    imagenet = list(range(N_IMAGENET))
    for name, ks in imagenet_to_domainnet().items():
        if not ks:
            continue
        if name not in index:
            raise ValueError(f"the paper's mapping links ImageNet classes to DomainNet class {name!r}, which the "
                             f"dataset lacks; the 1345-way merge needs the 345 DomainNet classes")
        for k in ks:
            if imagenet[k] != k:
                raise ValueError(f"ImageNet class {k} maps to two DomainNet classes; the merge is ambiguous")
            imagenet[k] = N_IMAGENET + index[name]
    return imagenet, [N_IMAGENET + j for j in range(len(domainnet_classes))]
