"""Offline pieces of the emoji builder: codepoint keys, CLDR parsing, iconify resolution, framing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipmech.data import build_emoji as be


def test_key_and_cldr(tmp_path):
    assert be._key("2764-FE0F") == "2764" and be._key("1f34e") == "1f34e"
    xml = tmp_path / "common" / "annotations" / "en.xml"
    xml.parent.mkdir(parents=True)
    xml.write_text('<ldml><annotations><annotation cp="🍎">apple | fruit | red</annotation>'
                   '<annotation cp="🍎" type="tts">red apple</annotation>'
                   '<annotation cp="❤️">love</annotation></annotations></ldml>', encoding="utf-8")
    cldr = be.read_cldr(tmp_path)
    assert cldr == {"1f34e": ("red apple", ["apple", "fruit", "red"])}  # no tts name -> dropped


def test_iconify_resolution(tmp_path):
    (tmp_path / "icons.json").write_text(json.dumps({
        "width": 32, "height": 32,
        "icons": {"red-apple": {"body": "<path d='M0 0h32v32z'/>", "width": 36}},
        "aliases": {"apple": {"parent": "red-apple"}, "flipped": {"parent": "red-apple", "hFlip": True}}}))
    (tmp_path / "chars.json").write_text(json.dumps({"1f34e": "red-apple"}))
    s = be.IconifySet(tmp_path)
    assert s.by_key == {"1f34e": "red-apple"}
    svg = s.svg([None, "missing", "apple"])
    assert 'viewBox="0 0 36 32"' in svg and "M0 0h32v32z" in svg
    assert s.svg(["flipped"]) is None  # transformed aliases are skipped, not drawn wrongly


def test_normalise_crops_centres_and_pads():
    im = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (10, 10, 30, 70))  # a 20 x 60 red bar off-centre
    out = be.normalise(im, 16, margin=2)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    rows, cols = np.flatnonzero(red.any(1)), np.flatnonzero(red.any(0))
    assert rows[0] == 2 and rows[-1] == 13  # fills the height inside the margin
    assert abs((cols[0] + cols[-1]) / 2 - 7.5) <= 0.5  # centred horizontally
    assert be.normalise(Image.new("RGBA", (8, 8)), 16, 2) is None  # nothing drawn


def test_svg_render_when_resvg_installed():
    pytest.importorskip("resvg_py")
    svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><circle cx="5" cy="5" r="4" fill="#00f"/></svg>'
    img = be.normalise(be._render_svg(svg), 20, 1)
    assert img[10, 10].tolist() == [0, 0, 255] and img[0, 0].tolist() == [255, 255, 255]
