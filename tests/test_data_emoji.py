"""The embedded emoji dataset: loads offline with the promised shape; mixtures work unchanged."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from clipmech.data import build_mixture, load_dataset
from clipmech.data.emoji import train_views


@pytest.fixture(scope="module")
def emoji():
    real_socket = socket.socket

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset('emoji') must not touch the network")

    socket.socket = no_network
    try:
        return load_dataset("emoji")
    finally:
        socket.socket = real_socket


def test_shape_and_coverage(emoji):
    assert emoji.domains == ["clipart", "flat", "painting", "quickdraw", "real", "sketch"]
    assert len({d[0] for d in emoji.domains}) == 6 and emoji.natural_domain == "real"
    assert len(emoji.classes) >= 100 and len(set(emoji.classes)) == len(emoji.classes)
    n = len(emoji)
    assert emoji.images.dtype == np.uint8 and emoji.images.shape[1:] in {(s, s, 3) for s in range(32, 65)}
    assert emoji.images.shape[0] == n == len(emoji.style_idx) == len(emoji.view_idx)
    assert (emoji.counts("train") > 0).all() and (emoji.counts("test") > 0).all()
    # >= 2 distinct drawings (styles) per (domain, class)
    distinct = np.zeros((6, len(emoji.classes)), int)
    orig = emoji.view_idx == 0
    np.add.at(distinct, (emoji.domain_idx[orig], emoji.class_idx[orig]), 1)
    assert distinct.min() >= 2
    styles = emoji.info["styles"]
    for d, dom in enumerate(emoji.domains):
        used = {styles[s]["key"] for s in np.unique(emoji.style_idx[emoji.domain_idx == d])}
        assert len(used) >= 2 and all(styles[s]["domain"] == dom for s in np.unique(emoji.style_idx[emoji.domain_idx == d]))
    assert all(s["licence"] in {"MIT", "Apache-2.0", "CC-BY-4.0", "OFL-1.1"} or "free use" in s["licence"] for s in styles)
    assert emoji.default_test_domain == "quickdraw" and len(emoji.default_test_classes) == 15
    assert all(emoji.keywords[c] for c in emoji.classes[:20])
    assert np.asarray(emoji.load_image(0)).shape == emoji.images.shape[1:]


def test_attribution_file_per_style(emoji):
    from clipmech.data.emoji import ASSET
    for s in emoji.info["styles"]:
        text = (ASSET.parent / f"ATTRIBUTION-{s['key']}.txt").read_text()
        assert s["licence"] in text


def test_views_flip_and_shift():
    img = np.full((1, 8, 8, 3), 255, np.uint8)
    img[0, 2, 1] = 0
    v = train_views(img, 4)
    assert np.array_equal(v[0, 0], img[0])
    assert v[0, 1, 2, 6, 0] == 0  # flipped: column 1 -> 6
    assert v[0, 2, 3, 3, 0] == 0  # shift (2, 1): row 2 -> 3, column 1 -> 3
    assert (v == 255).sum() == v.size - 4 * 3


def test_every_setup_on_emoji(emoji):
    S = None
    for setup in ["natural_only", "cg_low", "cg_high", "lod", "pseudo_low", "pseudo_high"]:
        m = build_mixture(emoji, setup)
        if setup == "natural_only":
            assert m.id == "lso-real-only"
            continue
        S = S or len(m.indices)
        assert len(m.indices) == S
    m = build_mixture(emoji, "cg_high", domains="pqrs", allow_p=0.2, aligned=True)
    assert m.id == "lso-pqrs-noquickdrawclasses-allow0.2-aligned" and len(m.indices) == S


def test_select_classes_renumbers_and_keeps_samples(emoji):
    c2 = list(emoji.default_test_classes)
    keep = [c2[0], emoji.classes[5], emoji.classes[1]]
    sub = emoji.select_classes(keep)
    order = sorted(emoji.class_index(c) for c in keep)
    assert sub.classes == [emoji.classes[k] for k in order]
    assert sub.default_test_classes == [c2[0]]
    for new, old in enumerate(order):
        rows = emoji.indices(classes=[old])
        assert (sub.class_idx == new).sum() == len(rows)
        np.testing.assert_array_equal(sub.images[sub.class_idx == new], emoji.images[rows])
        np.testing.assert_array_equal(sub.domain_idx[sub.class_idx == new], emoji.domain_idx[rows])
    assert sub.content_hash() != emoji.content_hash()
    with pytest.raises(KeyError, match="class"):
        emoji.select_classes(["no such class"])
