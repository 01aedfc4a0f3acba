"""Prompt-template sets for zero-shot classification (format strings with one "{}").

DOMAINNET_TEMPLATES: the paper's 86 (docs/methods.md#evaluation) = open_clip's 80 OpenAI ImageNet templates + 6
domain templates. EMOJI_TEMPLATES: the caption forms of the synthetic captions (docs/methods.md#data)
with the generic terms, plus "<term> of a {}" for every domain term of the emoji domains.
"""
from __future__ import annotations

from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipmech.utils import unknown_name_error

OPENAI_TEMPLATES: list[str] = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]  # the 80, as format strings

DOMAINNET_EXTRA_TEMPLATES = [
    "a clipart of the {}.", "a clipart of a {}.",
    "an infograph of the {}.", "an infograph of a {}.",
    "a quickdraw of the {}.", "a quickdraw of a {}.",
]
DOMAINNET_TEMPLATES: list[str] = OPENAI_TEMPLATES + DOMAINNET_EXTRA_TEMPLATES

EMOJI_TEMPLATES: list[str] = [
    "a {}.",
    "an image of a {}.", "a picture of a {}.",
    "a {} image.", "a {} picture.",
    "an image depicting a {}.", "a picture depicting a {}.",
    "a {} depicted in an image.", "a {} depicted in a picture.",
    "an image showing a {}.", "a picture showing a {}.",
    "a {} is visible in an image.", "a {} is visible in a picture.",
    "a clipart of a {}.", "an illustration of a {}.",
    "a flat icon of a {}.", "a vector graphic of a {}.",
    "a painting of a {}.", "art of a {}.",
    "a quickdraw of a {}.", "a doodle of a {}.",
    "a photo of a {}.", "a snapshot of a {}.",
    "a sketch of a {}.", "a drawing of a {}.",
]

TEMPLATE_SETS = {"domainnet": DOMAINNET_TEMPLATES, "emoji": EMOJI_TEMPLATES, "openai": OPENAI_TEMPLATES,
                 "simple": ["a {}."]}


def get_templates(spec: str | list[str], dataset_name: str | None = None) -> list[str]:
    """Resolve a template spec: a list of format strings, a set name (domainnet, emoji, openai,
    simple), "auto" (the set named like the dataset, else openai) or a text file, one per line."""
    if isinstance(spec, (list, tuple)):
        templates = list(spec)
    elif spec == "auto":
        templates = TEMPLATE_SETS.get(dataset_name or "", OPENAI_TEMPLATES)
    elif spec in TEMPLATE_SETS:
        templates = TEMPLATE_SETS[spec]
    elif Path(spec).is_file():
        templates = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    else:
        raise unknown_name_error("template set (or file)", spec, list(TEMPLATE_SETS) + ["auto"])
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"templates must be format strings with exactly one '{{}}'; bad: {bad[:3]}"
                         if bad else "empty template set")
    return list(templates)
