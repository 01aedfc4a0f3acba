"""ImageNet-Sketch for the paper's sketch add / mix mixtures (docs/methods.md#mixtures).

Captions: one `random.Random(seed)` stream over all images in ImageFolder order (sorted WordNet-id
folders, sorted files); per image a template drawn uniformly from the paper's 21 (`in_sketch_templates()`,
'{}' = OpenAI ImageNet class name), then the final period kept iff `random() < 0.5`.

Filters (`filter=`):
  "mapping" (default, the paper's): drop a sketch whose caption contains the OpenAI name of any
      ImageNet class the paper's mapping links to DomainNet (450 "shared" classes) as a
      case-sensitive substring. Names are substrings of others, so 514 ImageNet classes stay.
  "dn_substring": drop a sketch whose lower-cased caption contains any DomainNet class name
      (a first reading of the paper; keeps 620 classes, 196 of them mapped to DomainNet). NOT the paper's.
  "dn_words": the same with whole-word matches.
Variants (`with_in_sketches`):
  add: filtered IN-Sketch added to natural-only, leave-out-domain and CG-high; as many random dataset
       samples (seed) are dropped, so the mixture keeps its size;
  mix: from CG-high, the test domain keeps its samples only for a nested random subset of C1 classes
       (50 %, 30 %, 25 %, 10 %, 5 %, 1 % or one class), all IN sketches are added, and random samples
       of the other domains are dropped — as many as (IN lines added - test-domain samples removed),
       so the mixture keeps its size (the paper's code).
Own code: no library builds these mixtures. Layout read: ROOT/{wnid}/* or ROOT/sketch/{wnid}/*, the
1000 ImageNet class folders (n01440764 ...), as distributed.
"""
from __future__ import annotations

import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from clipmech.data.imagenet_mapping import imagenet_classnames, in_sketch_templates, shared_imagenet_classes, wnid_folders
from clipmech.data.mixtures import Mixture, content_entries

# mix-variant suffix -> fraction of C1 classes whose test-domain images are kept (None: one class)
KEEP = {"fiftyp": 0.5, "thirtyp": 0.3, "twentyfivep": 0.25, "tenp": 0.1, "fivep": 0.05, "onep": 0.01, "one": None}
FILTERS = ("mapping", "dn_substring", "dn_words")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_folders(root: str | Path) -> list[Path]:
    """The 1000 WordNet-id folders of an ImageNet-Sketch copy, sorted (= ImageNet class order)."""
    return wnid_folders(root, "sketch", "ImageNet-Sketch")[1]


def in_sketch_caption(rng: random.Random, templates: Sequence[str], classname: str) -> str:
    """One IN-Sketch caption: template (uniform), then the final period kept iff `random() < 0.5`."""
    text = rng.choice(templates).format(classname)
    return text if rng.random() < 0.5 or not text.endswith(".") else text[:-1]


def _filter(filter: str, exclude: Sequence[str] | None):
    """caption -> True when the filter drops it."""
    if filter not in FILTERS:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("ImageNet-Sketch filter", filter, FILTERS)
    if filter == "mapping":
        names = imagenet_classnames()
        shared = sorted({names[k] for k in shared_imagenet_classes()})
        return lambda text: any(n in text for n in shared)
    if exclude is None:
        raise ValueError(f"filter {filter!r} needs the DomainNet class names (exclude=...)")
    words = [n.lower() for n in exclude]
    if filter == "dn_substring":
        return lambda text: any(n in text.lower() for n in words)
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in words) + r")\b") if words else None
    return lambda text: bool(pattern and pattern.search(text.lower()))


def imagenet_sketch_lines(root: str | Path, exclude: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                          seed: int = 42, filter: str = "mapping") -> tuple[list[str], dict]:
    """'<path>\\t<caption>' lines of the ImageNet-Sketch images the filter keeps, and a manifest entry.

    exclude: DomainNet class names (only the dn_* filters use them). templates: '{}'-templates
    (default: the paper's 21). Images in file-name order within sorted class folders; one seeded
    stream over all images, dropped ones included. Cost: one directory scan, no image is opened."""
    templates = list(in_sketch_templates() if templates is None else templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"ImageNet-Sketch templates must be a non-empty list with '{{}}' for the class name, "
                         f"got {templates!r}")
    dropped = _filter(filter, exclude)
    names = imagenet_classnames()
    rng = random.Random(seed)
    lines, kept, excluded = [], set(), set()
    for k, folder in enumerate(class_folders(root)):
        for f in sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            text = in_sketch_caption(rng, templates, names[k])
            if dropped(text):
                excluded.add(k)
                continue
            if "\t" in text or "\n" in text:
                raise ValueError(f"caption {text!r} contains a tab or newline; the TSV cannot hold it")
            lines.append(f"{f.resolve()}\t{text}")
            kept.add(k)
    info = {"root": str(Path(root).resolve()), "n_lines": len(lines), "n_classes_kept": len(kept),
            "n_classes_excluded": len(excluded), "excluded_classes": [names[k] for k in sorted(excluded)],
            "templates": templates, "seed": seed, "filter": filter}
    return lines, info


def add_imagenet_sketch(mixture: Mixture, root: str | Path, keep: str | None = None, filter: str = "mapping",
                        seed: int = 42) -> Mixture:
    """`with_in_sketches` with the lines of the ImageNet-Sketch copy at `root` (filter as above; the
    dn_* filters use the mixture's dataset classes), captioned with `seed` (the mixture's caption seed)."""
    lines, info = imagenet_sketch_lines(root, mixture.dataset.classes, seed=seed, filter=filter)
    return with_in_sketches(mixture, lines, info, keep=keep, seed=seed)


def with_in_sketches(m: Mixture, lines: Sequence[str], info: dict, keep: str | None = None,
                     seed: int = 42) -> Mixture:
    """The paper's ImageNet-Sketch variant of mixture `m` (module docstring). keep=None ("add";
    setups natural_only, lod, cg_high): add `lines`, drop as many random dataset samples. keep in
    KEEP ("mix"; cg_high): keep the test domain's samples only for a nested random subset of C1
    classes (floor(fraction * |C1|), at least one), add the lines, drop (lines - removed) random
    samples of the other domains; if the lines are fewer than the removed samples nothing is dropped
    and the mixture shrinks (manifest `size_change`). The id gains -with-in-sketches[-KEEP].
    Deterministic in `seed`. Cost O(N)."""
    setup = m.manifest.get("setup")
    allowed = ("natural_only", "lod", "cg_high") if keep is None else ("cg_high",)
    if keep is not None and keep not in KEEP:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("ImageNet-Sketch keep variant", keep, list(KEEP))
    if setup not in allowed:
        raise ValueError(f"the ImageNet-Sketch {'mix' if keep else 'add'} variant applies to setups {allowed}, "
                         f"not {setup!r} (docs/methods.md#mixtures)")
    if m.extra_lines:
        raise ValueError(f"mixture {m.id} already has {len(m.extra_lines)} extra lines")
    if not lines:
        raise ValueError("no ImageNet-Sketch lines to add (did the filter remove every image?)")
    ds, idx, caps = m.dataset, m.indices, np.asarray(m.captions, dtype=object)
    droppable = np.ones(len(idx), dtype=bool)
    kept_classes: list[str] | None = None
    removed = 0
    if keep is not None:
        d_star = ds.domain_index(m.manifest["test_domain"])
        c2 = {ds.class_index(c) for c in m.manifest["test_classes"]}
        c1 = np.array([c for c in range(len(ds.classes)) if c not in c2])
        # floor (25 % of 330 = 82), at least one class on small datasets
        n_keep = 1 if KEEP[keep] is None else max(1, int(Fraction(str(KEEP[keep])) * len(c1)))
        chosen = np.random.default_rng(seed).permutation(c1)[:n_keep]  # one permutation: nested subsets
        kept_classes = [ds.classes[c] for c in sorted(chosen)]
        gone = (ds.domain_idx[idx] == d_star) & ~np.isin(ds.class_idx[idx], chosen)
        removed = int(gone.sum())
        idx, caps = idx[~gone], caps[~gone]
        droppable = ds.domain_idx[idx] != d_star
    n_drop = max(0, len(lines) - removed)
    candidates = np.flatnonzero(droppable)
    if n_drop > len(candidates):
        raise ValueError(f"cannot add {len(lines)} ImageNet-Sketch lines: only {len(candidates)} dataset samples "
                         "can be dropped to make room")
    drop = np.random.default_rng(seed).choice(candidates, n_drop, replace=False)
    stay = np.ones(len(idx), dtype=bool)
    stay[drop] = False
    out = Mixture(ds, idx[stay], list(caps[stay]), {}, m.id + "-with-in-sketches" + (f"-{keep}" if keep else ""),
                  split=m.split, base_lines=list(m.base_lines), extra_lines=list(lines))
    out.manifest = {**m.manifest, "id": out.id, **content_entries(out),
                    "in_sketch": {**info, "variant": "mix" if keep else "add", "keep": keep,
                                  "kept_c1_classes": kept_classes, "variant_seed": seed,
                                  "test_domain_samples_removed": removed, "random_samples_dropped": n_drop,
                                  "size_change": len(out) - len(m)}}
    return out
