"""Synthetic captions for domain datasets (docs/methods.md#data).

One caption per image from 6 templates; the domain term is drawn from the generic terms
{image, picture} plus two domain-specific terms, so about half the captions name the domain; the
final period is kept iff `random() < 0.5`. "Aligned" captions use only the generic terms for every
domain. As in the paper, ONE `random.Random(seed)` stream captions the whole dataset: domains in the
dataset's order (DomainNet: clipart, infograph, painting, quickdraw, real, sketch), per domain train
then test, samples in file order, three draws per sample: template, period, term. An image's caption
therefore does not depend on which mixture it ends up in, but does depend on every sample listed
before it (a dataset loaded with fewer domains or files gets other captions).
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
    """One caption, the paper's draws in its order: template (uniform), period kept iff
    `random() < 0.5`, term (uniform)."""
    template = rng.choice(templates)
    keep_period = rng.random() < 0.5
    term = rng.choice(terms)
    text = template.format(A=article(term), T=term, C=classname)
    return text if keep_period or not text.endswith(".") else text[:-1]


def make_captions(dataset: DomainDataset, indices: Sequence[int] | np.ndarray, seed: int = 42,
                  aligned: bool = False, templates: Sequence[str] | None = None) -> list[str]:
    """Captions for `indices` (list aligned with them), cut from the single stream of the module
    docstring. Deterministic in (dataset, seed, aligned, templates). Cost: captions every sample of
    the dataset (the stream runs through all of them), O(N) string ops, ~1 s per 500k samples.
    """
    templates = _check_templates(TEMPLATES if templates is None else templates)
    indices = np.asarray(indices, dtype=np.int64)
    # every domain's terms: random.choice consumes a number of bits that depends on the list length
    terms = [domain_terms(dataset, dom, aligned) for dom in dataset.domains]
    wanted = set(indices.tolist())
    out: dict[int, str] = {}
    rng = random.Random(seed)
    for d in range(len(dataset.domains)):
        for s in ("train", "test"):
            for i in np.flatnonzero((dataset.domain_idx == d) & (dataset.split == s)).tolist():
                # every sample draws, wanted or not, so each caption sits at its paper position
                text = caption(rng, templates, terms[d], dataset.classes[dataset.class_idx[i]])
                if i in wanted:
                    out[i] = text
    return [out[int(i)] for i in indices]
