"""Synthetic captions for domain datasets (paper.md §3.4).

One caption per image from 6 templates; the domain term is drawn from the generic terms
{image, picture} plus two domain-specific terms, so about half the captions name the domain; the
final period is dropped with p = 0.5. "Aligned" captions use only the generic terms for every
domain. Like the paper's per-domain caption files, each (domain, split) group is captioned in file
order by its own `random.Random(seed)`, so an image's caption does not depend on which mixture
it ends up in.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from clipmech.data.dataset import DomainDataset

TEMPLATES = (
    "{A}{T} of a {C}.",
    "a {C} {T}.",
    "{A}{T} depicting a {C}.",
    "a {C} depicted in {A}{T}.",
    "{A}{T} showing a {C}.",
    "a {C} is visible in {A}{T}.",
)
GENERIC_TERMS = ("image", "picture")
DOMAIN_TERMS = {
    "clipart": ("clipart", "illustration"),
    "infograph": ("infograph", "informational chart"),
    "painting": ("painting", "art"),
    "quickdraw": ("quickdraw", "doodle"),
    "real": ("photo", "snapshot"),
    "sketch": ("sketch", "drawing"),
}
# The paper's articles; terms it does not name get "an" before a vowel, "a" otherwise.
ARTICLES = {"image": "an ", "illustration": "an ", "infograph": "an ", "informational chart": "an ", "art": ""}


def article(term: str) -> str:
    """The article (with trailing space, or empty) the templates put before `term`."""
    if term in ARTICLES:
        return ARTICLES[term]
    return "an " if term[:1].lower() in "aeiou" else "a "


def domain_terms(dataset: DomainDataset, domain: str, aligned: bool = False) -> list[str]:
    """Terms a caption of `domain` may use: generic + domain-specific (generic only if aligned)."""
    if aligned:
        return list(GENERIC_TERMS)
    specific = dataset.domain_terms.get(domain) or DOMAIN_TERMS.get(domain)
    if specific is None:
        raise KeyError(f"no caption terms for domain {domain!r} of dataset {dataset.name!r}; set "
                       f"dataset.domain_terms[{domain!r}] = ['term1', 'term2'] or use aligned captions")
    return [*GENERIC_TERMS, *specific]


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ValueError("templates must be a non-empty list of strings")
    for t in templates:
        if "{C}" not in t:
            raise ValueError(f"caption template {t!r} lacks the class placeholder {{C}} "
                             "(placeholders: {A} article, {T} domain term, {C} class)")
    return templates


def caption(rng: random.Random, templates: Sequence[str], terms: Sequence[str], classname: str) -> str:
    """One caption: template, term and period drop drawn from `rng` in that order."""
    template = rng.choice(templates)
    term = rng.choice(terms)
    text = template.format(A=article(term), T=term, C=classname)
    if rng.random() < 0.5 and text.endswith("."):
        text = text[:-1]
    return text


def make_captions(dataset: DomainDataset, indices: Sequence[int] | np.ndarray, seed: int = 42,
                  aligned: bool = False, templates: Sequence[str] | None = None) -> list[str]:
    """Captions for `indices` (list aligned with them). Deterministic in (dataset, seed, aligned,
    templates). Cost: captions every sample of the touched (domain, split) groups, O(N) string ops.
    """
    templates = _check_templates(TEMPLATES if templates is None else templates)
    indices = np.asarray(indices, dtype=np.int64)
    out: dict[int, str] = {}
    groups = {(int(d), s) for d, s in zip(dataset.domain_idx[indices], dataset.split[indices])}
    for d, s in sorted(groups):
        dom = dataset.domains[d]
        terms = domain_terms(dataset, dom, aligned)
        rng = random.Random(seed)
        for i in np.flatnonzero((dataset.domain_idx == d) & (dataset.split == s)):
            out[int(i)] = caption(rng, templates, terms, dataset.classes[dataset.class_idx[i]])
    return [out[int(i)] for i in indices]
