"""Captions (paper.md §3.4): templates, terms, articles, period drop, determinism, aligned."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from clipmech.data import DomainNet, build_mixture, make_captions
from clipmech.data.captions import TEMPLATES, article, caption
from clipmech.data.synthetic import write_fake_domainnet


@pytest.fixture(scope="module")
def dn(tmp_path_factory):
    return DomainNet(write_fake_domainnet(tmp_path_factory.mktemp("dn")))


def _pattern(templates, terms, cls):
    alts = []
    for t in templates:
        for term in terms:
            alts.append(re.escape(t.format(A=article(term), T=term, C=cls)).removesuffix(r"\.") + r"\.?")
    return re.compile("^(" + "|".join(alts) + ")$")


def test_articles_match_paper():
    assert [article(t) for t in ["image", "picture", "illustration", "informational chart", "art", "photo",
                                 "doodle", "infograph", "icon"]] == ["an ", "a ", "an ", "an ", "", "a ", "a ", "an ", "an "]


def test_captions_use_templates_terms_and_drop_periods(dn):
    idx = dn.indices()
    caps = make_captions(dn, idx)
    terms = {"clipart": ["clipart", "illustration"], "infograph": ["infograph", "informational chart"],
             "painting": ["painting", "art"], "quickdraw": ["quickdraw", "doodle"], "real": ["photo", "snapshot"],
             "sketch": ["sketch", "drawing"]}
    for i, c in zip(idx, caps):
        dom = dn.domains[dn.domain_idx[i]]
        assert _pattern(TEMPLATES, ["image", "picture", *terms[dom]], dn.classes[dn.class_idx[i]]).match(c), c
    frac = np.mean([c.endswith(".") for c in caps])
    assert 0.35 < frac < 0.65  # period kept with p = 0.5


def test_caption_draw_order_is_fixed():
    # paper.md §3.4: template, then the period coin (kept iff random() < 0.5), then the term
    rng, ref = random.Random(42), random.Random(42)
    for _ in range(50):
        got = caption(rng, TEMPLATES, ["image", "picture", "sketch", "drawing"], "axe")
        t, keep, term = ref.choice(TEMPLATES), ref.random() < 0.5, ref.choice(["image", "picture", "sketch", "drawing"])
        want = t.format(A=article(term), T=term, C="axe")
        assert got == (want if keep else want[:-1])


def test_first_captions_follow_the_single_paper_stream(dn):
    """paper.md §3.4, re-derived from the split files: one random.Random(42) over clipart, infograph,
    painting, quickdraw, real, sketch; per domain train then test lines in file order."""
    root, rng, want = Path(dn.root), random.Random(42), {}
    terms = {"clipart": ["clipart", "illustration"], "infograph": ["infograph", "informational chart"],
             "painting": ["painting", "art"], "quickdraw": ["quickdraw", "doodle"], "real": ["photo", "snapshot"],
             "sketch": ["sketch", "drawing"]}
    for dom in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"):
        for split in ("train", "test"):
            for line in (root / f"{dom}_{split}.txt").read_text().splitlines():
                rel = line.split()[0]
                t, keep, term = rng.choice(TEMPLATES), rng.random() < 0.5, rng.choice(["image", "picture", *terms[dom]])
                text = t.format(A=article(term), T=term, C=rel.split("/")[1].replace("_", " "))
                want[str(root / rel)] = text if keep else text[:-1]
    got = dict(zip(dn.sources, make_captions(dn, dn.indices())))
    assert got == want
    first_sketch_train = (root / "sketch_train.txt").read_text().split()[0]
    # a mixture of one domain cuts the same captions from the same stream
    idx = dn.indices("train", domains=["sketch"])
    assert make_captions(dn, idx)[0] == want[str(root / first_sketch_train)]


def test_deterministic_and_independent_of_mixture(dn):
    idx = dn.indices("train")
    assert make_captions(dn, idx) == make_captions(dn, idx)
    assert make_captions(dn, idx) != make_captions(dn, idx, seed=0)
    low = build_mixture(dn, "cg_low", test_domain="sketch", test_classes=["axe"])
    high = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=["axe"])
    a, b = dict(zip(low.indices.tolist(), low.captions)), dict(zip(high.indices.tolist(), high.captions))
    shared = set(a) & set(b)
    assert shared and all(a[i] == b[i] for i in shared)


def test_aligned_only_generic_terms(dn):
    caps = make_captions(dn, dn.indices(), aligned=True)
    for i, c in zip(dn.indices(), caps):
        assert _pattern(TEMPLATES, ["image", "picture"], dn.classes[dn.class_idx[i]]).match(c), c


def test_user_templates_and_errors(dn):
    idx = dn.indices()[:20]
    caps = make_captions(dn, idx, templates=["{C} in {A}{T}."])
    for i, c in zip(idx, caps):
        terms = ["image", "picture", "clipart", "illustration"]  # the first 20 samples are clipart
        assert _pattern(["{C} in {A}{T}."], terms, dn.classes[dn.class_idx[i]]).match(c), c
    with pytest.raises(ValueError, match=r"\{C\}"):
        make_captions(dn, [0], templates=["a picture"])
    sub = dn.subset(dn.indices())
    sub.domains = [*sub.domains[:5], "mosaic"]
    with pytest.raises(KeyError, match="mosaic"):
        make_captions(sub, sub.indices(domains=[5]))
