"""ImageNet-Sketch for the paper's sketch add / mix mixtures (paper.md §4 "ImageNet-Sketch variants").

The paper adds ImageNet-Sketch drawings of classes with no DomainNet counterpart to sketch mixtures:
  add: filtered IN-Sketch added to natural-only, leave-out-domain and CG-high; as many random
       DomainNet samples (seed 42) are dropped, so the mixture keeps its size;
  mix: from CG-high, the test domain keeps its DomainNet images only for a nested random subset of C1
       classes (50 %, 30 %, 25 %, 10 %, 5 %, 1 % or one class), all IN sketches are added, and random
       DomainNet samples of the other domains are dropped — [INFER] as many as IN lines were added,
       the add rule; paper.md does not say how many.
The filter is the paper's: a sample is dropped when any DomainNet class name is a substring of its
caption, which is over-aggressive ("ant" hits "elephant"); `word_match=True` matches whole words.
Captions: one of `IN_SKETCH_TEMPLATES` with the OpenAI ImageNet class name (open_clip's list, index
order = sorted WordNet ids), final period dropped with p = 0.5, seeded. paper.md quotes 4 of the
paper's 21 templates; those 4 are the default, and any other set can be passed.

Own code: no library builds these mixtures. Layout read: ROOT/{wnid}/* or ROOT/sketch/{wnid}/*, the
1000 ImageNet class folders (n01440764 ...), as distributed.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

from clipmech.data.captions import _check_templates, caption

IN_SKETCH_TEMPLATES = ("{C}.", "a {C} drawing.", "sketch of the {C}.", "an image of a {C}.")
# mix-variant suffix -> fraction of C1 classes whose test-domain images are kept (None: one class)
KEEP = {"fiftyp": 0.5, "thirtyp": 0.3, "twentyfivep": 0.25, "tenp": 0.1, "fivep": 0.05, "onep": 0.01, "one": None}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_folders(root: str | Path) -> list[Path]:
    """The 1000 WordNet-id folders of an ImageNet-Sketch copy, sorted (= ImageNet class order)."""
    root = Path(root)
    base = root / "sketch" if (root / "sketch").is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"ImageNet-Sketch root {root} does not exist")
    folders = sorted(p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"n\d{8}", p.name))
    if len(folders) != 1000:
        raise ValueError(f"{base} has {len(folders)} WordNet-id class folders (n01440764 ...), expected the 1000 "
                         "of ImageNet-Sketch; class names are assigned by their sorted order, so all must be present")
    return folders


def imagenet_sketch_lines(root: str | Path, exclude: Sequence[str], templates: Sequence[str] = IN_SKETCH_TEMPLATES,
                          seed: int = 42, word_match: bool = False) -> tuple[list[str], dict]:
    """'<path>\\t<caption>' lines of ImageNet-Sketch images whose caption names no class of `exclude`
    (DomainNet class names), and a manifest entry. Images in file-name order within sorted class
    folders; one seeded RNG over all images. Cost: one directory scan, no image is opened."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    templates = _check_templates(templates)
    names = [n.lower() for n in exclude]
    if word_match:
        pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b") if names else None
        hit = (lambda text: bool(pattern and pattern.search(text)))
    else:
        hit = (lambda text: any(n in text for n in names))
    rng = random.Random(seed)
    lines, kept, excluded = [], set(), set()
    for k, folder in enumerate(class_folders(root)):
        for f in sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            text = caption(rng, templates, ["sketch"], IMAGENET_CLASSNAMES[k])
            if hit(text.lower()):
                excluded.add(IMAGENET_CLASSNAMES[k])
                continue
            if "\t" in text or "\n" in text:
                raise ValueError(f"caption {text!r} contains a tab or newline; the TSV cannot hold it")
            lines.append(f"{f.resolve()}\t{text}")
            kept.add(IMAGENET_CLASSNAMES[k])
    info = {"root": str(Path(root).resolve()), "n_lines": len(lines), "n_classes_kept": len(kept),
            "n_classes_excluded": len(excluded), "excluded_classes": sorted(excluded), "templates": list(templates),
            "seed": seed, "filter": "whole words" if word_match else "substring (paper)"}
    return lines, info


def add_imagenet_sketch(mixture, root: str | Path, keep: str | None = None, word_match: bool = False,
                        seed: int = 42):
    """`mixtures.with_in_sketches` with the lines of the ImageNet-Sketch copy at `root`, filtered
    against the mixture's dataset classes and captioned with `seed` (the mixture's caption seed)."""
    from clipmech.data.mixtures import with_in_sketches
    lines, info = imagenet_sketch_lines(root, mixture.dataset.classes, seed=seed, word_match=word_match)
    return with_in_sketches(mixture, lines, info, keep=keep, seed=seed)
