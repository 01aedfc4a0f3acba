"""Builder of the embedded "emoji domains" dataset (`clipmech data build-emoji`).

Fetches emoji artwork through the package registries (npm `npm pack`, Debian `apt-get download`,
PyPI `pip download`) into a temporary folder, renders every object emoji of every style to a
`size` x `size` RGB image on white, and writes one compressed `.npz` plus one attribution file per
style into `clipmech/data/assets/`. Only the build needs the network; loading the result does not.

Domains (DomainNet-like roles, unique initials c f p q r s) and the styles grouped into each:

    clipart    Twemoji (CC-BY-4.0), EmojiOne 2 (CC-BY-4.0)
    flat       Fluent Flat (MIT), FxEmoji (Apache-2.0), Streamline (CC-BY-4.0)
    painting   Noto Color (Apache-2.0), Noto v1 "blob" era (Apache-2.0)
    quickdraw  Fluent High Contrast (MIT), EmojiOne monotone (CC-BY-4.0)
    real       Fluent 3D renders (MIT), Fluent Color (MIT)
    sketch     Noto Emoji mono outline font (OFL-1.1), Symbola font (free use and redistribution)

Fluent Color and Fluent Flat reuse the shapes of Fluent 3D (mean absolute pixel difference to
Fluent 3D / Color 5 and 14 of 255, against 38-74 between the other style pairs of a domain), so
"flat" is close to "real" and a weak test domain; "real" instances are near-duplicates.

No share-alike art (OpenMoji, EmojiOne v1, Debian's EmojiOne PNGs) and no Apple / Facebook /
emojify art. Classes = single-codepoint emoji of the Noto categories Animals & Nature, Food &
Drink, Travel & Places, Objects, Activities that at least `min_styles` styles of every domain draw
(every (class, domain) has >= 2 distinct instances). Names and keywords: CLDR English annotations.

Split rule (in-domain train/test): for class k in a domain whose available styles, in the table
order above, are s_0..s_{n-1}, the instance of style s_{k mod n} is 'test' and the others are
'train'; every (class, domain) thus has >= 1 train and exactly 1 test image and every style
appears in both splits.

Rasterising: SVG via resvg-py (extra `build-data`), fonts and WebP via Pillow. Each image is cropped
to its drawn content, padded to a square and resized (Lanczos) so that emoji of every style fill
the frame alike. Our own code: no library packages emoji sets as a domain-labelled dataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ASSET_DIR = Path(__file__).parent / "assets"
ASSET_NAME = "emoji_domains.npz"
DOMAINS = ["clipart", "flat", "painting", "quickdraw", "real", "sketch"]
OBJECT_CATEGORIES = ["Animals & Nature", "Food & Drink", "Travel & Places", "Objects", "Activities"]
DEFAULT_TEST_DOMAIN = "quickdraw"
# The paper's 15 C2 classes (docs/methods.md#data); the emoji default C2 set takes those that exist as
# emoji class names (exact CLDR name) and fills up to 15 with the classes of smallest sha256(name).
PAPER_C2 = ["aircraft carrier", "axe", "banana", "barn", "bed", "candle", "lion", "mountain",
            "necklace", "penguin", "pizza", "saxophone", "television", "tractor", "traffic light"]

NPM = {  # package -> pinned version
    "@iconify-json/twemoji": "1.2.5", "@iconify-json/emojione": "1.2.3",
    "@iconify-json/fluent-emoji-flat": "1.2.6", "@iconify-json/fxemoji": "1.2.2",
    "@iconify-json/streamline-emojis": "1.2.4", "@iconify-json/noto": "1.2.9",
    "@iconify-json/noto-v1": "1.2.5", "@iconify-json/fluent-emoji-high-contrast": "1.2.6",
    "@iconify-json/emojione-monotone": "1.2.1", "@iconify-json/fluent-emoji": "1.2.7",
    "@lobehub/fluent-emoji-3d": "1.1.0",
}
DEBIAN = ["unicode-cldr-core", "fonts-symbola"]
PYPI = {"manimgx-fonts": "2026.9.26.post1"}  # ships NotoEmoji[wght].ttf (Noto Emoji mono, OFL)


@dataclass(frozen=True)
class Style:
    key: str
    title: str
    domain: str
    kind: str          # "iconify" | "webp" | "font"
    source: str        # npm package, or file glob inside the fetched sources
    licence: str
    credit: str
    url: str


STYLES = [
    Style("twemoji", "Twemoji", "clipart", "iconify", "@iconify-json/twemoji", "CC-BY-4.0",
          "Copyright Twitter, Inc. and other contributors (jdecked/twemoji)", "https://github.com/jdecked/twemoji"),
    Style("emojione", "EmojiOne 2", "clipart", "iconify", "@iconify-json/emojione", "CC-BY-4.0",
          "Emoji artwork by EmojiOne (Ranks.com)", "https://github.com/joypixels/emojione-legacy"),
    Style("fluent-flat", "Fluent Emoji Flat", "flat", "iconify", "@iconify-json/fluent-emoji-flat", "MIT",
          "Copyright (c) Microsoft Corporation", "https://github.com/microsoft/fluentui-emoji"),
    Style("fxemoji", "FxEmoji (Firefox OS)", "flat", "iconify", "@iconify-json/fxemoji", "Apache-2.0",
          "Copyright 2015 Mozilla Foundation", "https://github.com/mozilla/fxemoji"),
    Style("streamline", "Streamline Emojis", "flat", "iconify", "@iconify-json/streamline-emojis", "CC-BY-4.0",
          "Streamline Emojis by Streamline (webalys)", "https://github.com/webalys/streamline-emojis"),
    Style("noto", "Noto Color Emoji", "painting", "iconify", "@iconify-json/noto", "Apache-2.0",
          "Copyright Google Inc.", "https://github.com/googlefonts/noto-emoji"),
    Style("noto-v1", "Noto Emoji v1", "painting", "iconify", "@iconify-json/noto-v1", "Apache-2.0",
          "Copyright Google Inc.", "https://github.com/googlefonts/noto-emoji"),
    Style("fluent-hc", "Fluent Emoji High Contrast", "quickdraw", "iconify",
          "@iconify-json/fluent-emoji-high-contrast", "MIT", "Copyright (c) Microsoft Corporation",
          "https://github.com/microsoft/fluentui-emoji"),
    Style("emojione-mono", "EmojiOne monotone", "quickdraw", "iconify", "@iconify-json/emojione-monotone",
          "CC-BY-4.0", "Emoji artwork by EmojiOne (Ranks.com)", "https://github.com/joypixels/emojione-legacy"),
    Style("fluent-3d", "Fluent Emoji 3D", "real", "webp", "@lobehub/fluent-emoji-3d", "MIT",
          "Copyright (c) Microsoft Corporation", "https://github.com/microsoft/fluentui-emoji"),
    Style("fluent-color", "Fluent Emoji Color", "real", "iconify", "@iconify-json/fluent-emoji", "MIT",
          "Copyright (c) Microsoft Corporation", "https://github.com/microsoft/fluentui-emoji"),
    Style("noto-mono", "Noto Emoji (monochrome)", "sketch", "font", "NotoEmoji*.ttf", "OFL-1.1",
          "Copyright 2013 Google LLC", "https://github.com/googlefonts/noto-emoji"),
    Style("symbola", "Symbola", "sketch", "font", "Symbola*.ttf",
          "free use, modification and redistribution (author's licence)", "Copyright (C) 2007-2015 George Douros",
          "https://packages.debian.org/bookworm/fonts-symbola"),
]

RENDER = 256  # intermediate render size before crop + resize


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()[-500:]}")


def fetch_sources(dest: Path) -> Path:
    """Download every source package into `dest` and unpack it (npm, apt-get download, pip)."""
    dest.mkdir(parents=True, exist_ok=True)
    for tool in ("npm", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"build-emoji needs `{tool}` on PATH (or pass --sources with unpacked packages)")
    for pkg, ver in NPM.items():
        out = dest / "npm" / pkg.replace("/", "__")
        if out.exists():
            continue
        out.mkdir(parents=True)
        _run(["npm", "pack", f"{pkg}@{ver}", "--silent"], cwd=out)
        with tarfile.open(next(out.glob("*.tgz"))) as tar:
            tar.extractall(out, filter="data")
    deb = dest / "deb"
    if not deb.exists():
        deb.mkdir()
        _run(["apt-get", "download", *DEBIAN], cwd=deb)
        for f in sorted(deb.glob("*.deb")):
            _run(["dpkg", "-x", f.name, "root"], cwd=deb)
    pypi = dest / "pypi"
    if not pypi.exists():
        pypi.mkdir()
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", ".",
              *[f"{k}=={v}" for k, v in PYPI.items()]], cwd=pypi)
        for whl in sorted(pypi.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(pypi / "x")
    return dest


def _npm_dir(src: Path, pkg: str) -> Path:
    return src / "npm" / pkg.replace("/", "__") / "package"


def _find(src: Path, pattern: str) -> Path:
    hits = sorted(src.rglob(pattern))
    if not hits:
        raise FileNotFoundError(f"no file matching {pattern!r} under {src}")
    return hits[0]


def _key(seq: str) -> str:
    """Normalised codepoint key: lowercase hex, '-' joined, without variation selector fe0f."""
    return "-".join(p for p in seq.lower().split("-") if p != "fe0f")


def read_cldr(src: Path) -> dict[str, tuple[str, list[str]]]:
    """CLDR English annotations: codepoint key -> (name, keywords)."""
    root = ET.parse(_find(src, "annotations/en.xml")).getroot()
    out: dict[str, list] = {}
    for a in root.iter("annotation"):
        k = _key("-".join(f"{ord(c):x}" for c in a.get("cp")))
        entry = out.setdefault(k, [None, []])
        if a.get("type") == "tts":
            entry[0] = a.text.strip()
        else:
            entry[1] = [w.strip() for w in a.text.split("|") if w.strip()]
    return {k: (v[0], v[1]) for k, v in out.items() if v[0]}


def candidate_keys(src: Path) -> list[str]:
    """Single-codepoint emoji of the object categories (Noto's iconify metadata), sorted."""
    d = _npm_dir(src, "@iconify-json/noto")
    cats = json.loads((d / "metadata.json").read_text())["categories"]
    name_to_key = {v: _key(k) for k, v in json.loads((d / "chars.json").read_text()).items()}
    keys = {name_to_key[n] for c in OBJECT_CATEGORIES for n in cats.get(c, []) if n in name_to_key}
    return sorted(k for k in keys if "-" not in k)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("’", "").replace("'", "")).strip("-")


class IconifySet:
    """An iconify JSON icon set: resolve an emoji key to an SVG string."""

    def __init__(self, folder: Path):
        data = json.loads((folder / "icons.json").read_text())
        self.icons, self.aliases = data["icons"], data.get("aliases", {})
        self.width, self.height = data.get("width", 16), data.get("height", 16)
        chars = folder / "chars.json"
        self.by_key = {}
        if chars.exists():
            for k, v in json.loads(chars.read_text()).items():
                self.by_key.setdefault(_key(k), v)

    def resolve(self, name: str) -> dict | None:
        seen = 0
        while name not in self.icons:
            alias = self.aliases.get(name)
            # transformed aliases (rotate / flip) are skipped rather than re-implemented
            if alias is None or seen > 8 or set(alias) - {"parent"}:
                return None
            name, seen = alias["parent"], seen + 1
        return self.icons[name]

    def svg(self, names: list[str]) -> str | None:
        for n in names:
            icon = self.resolve(n) if n else None
            if icon is not None:
                w, h = icon.get("width", self.width), icon.get("height", self.height)
                x, y = icon.get("left", 0), icon.get("top", 0)
                return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                        f'viewBox="{x} {y} {w} {h}" width="{RENDER}" height="{RENDER}">{icon["body"]}</svg>')
        return None


_NEEDS_EXTRA = "building the emoji dataset needs the build-data extra: pip install -e '.[build-data]'"


def _render_svg(svg: str) -> Image.Image:
    try:
        import resvg_py
    except ImportError as err:
        raise ImportError(_NEEDS_EXTRA) from err
    return Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=svg, width=RENDER, height=RENDER)))).convert("RGBA")


def _render_glyph(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image:
    im = Image.new("RGBA", (RENDER * 2, RENDER * 2), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((RENDER, RENDER), ch, font=font, fill=(0, 0, 0, 255), anchor="mm")
    return im


def normalise(im: Image.Image, size: int, margin: int) -> np.ndarray | None:
    """Composite RGBA on white, crop to drawn content, pad square, resize to size x size uint8 RGB."""
    im = im.convert("RGBA")
    bbox = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox is None:
        return None
    im = im.crop(bbox)
    side = max(im.size)
    sq = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    sq.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
    inner = size - 2 * margin
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(sq.convert("RGB").resize((inner, inner), Image.Resampling.LANCZOS), (margin, margin))
    return np.asarray(out, dtype=np.uint8)


def render_style(style: Style, src: Path, keys: list[str], cldr: dict, noto_names: dict[str, str],
                 size: int, margin: int) -> dict[str, np.ndarray]:
    """Render every key the style draws: key -> uint8[size, size, 3]."""
    out: dict[str, np.ndarray] = {}
    if style.kind == "iconify":
        s = IconifySet(_npm_dir(src, style.source))
        for k in keys:
            ch = chr(int(k, 16))
            names = [s.by_key.get(k), noto_names.get(k), _slug(cldr[k][0]),
                     re.sub(r"[^a-z0-9]", "", unicodedata.name(ch, "").lower())]  # fxemoji: Unicode names
            svg = s.svg(names)
            if svg is not None and (img := normalise(_render_svg(svg), size, margin)) is not None:
                out[k] = img
    elif style.kind == "webp":
        files = {_key(p.stem): p for p in (_npm_dir(src, style.source) / "assets").glob("*.webp")}
        for k in keys:
            if k in files and (img := normalise(Image.open(files[k]), size, margin)) is not None:
                out[k] = img
    elif style.kind == "font":
        try:
            from fontTools.ttLib import TTFont
        except ImportError as err:
            raise ImportError(_NEEDS_EXTRA) from err
        path = _find(src, style.source)
        cmap = TTFont(path).getBestCmap()
        font = ImageFont.truetype(str(path), RENDER)
        for k in keys:
            if int(k, 16) in cmap and (img := normalise(_render_glyph(font, chr(int(k, 16))), size, margin)) is not None:
                out[k] = img
    return out


LICENCE_TEXT = {
    "MIT": ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
            "associated documentation files (the \"Software\"), to deal in the Software without restriction, "
            "including without limitation the rights to use, copy, modify, merge, publish, distribute, "
            "sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is "
            "furnished to do so, subject to the following conditions:\n\nThe above copyright notice and this "
            "permission notice shall be included in all copies or substantial portions of the Software.\n\n"
            "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT "
            "NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND "
            "NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES "
            "OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN "
            "CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."),
    "Apache-2.0": ("Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file "
                   "except in compliance with the License. You may obtain a copy of the License at "
                   "http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable law or agreed to "
                   "in writing, software distributed under the License is distributed on an \"AS IS\" BASIS, "
                   "WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied."),
    "CC-BY-4.0": ("Licensed under the Creative Commons Attribution 4.0 International licence, "
                  "https://creativecommons.org/licenses/by/4.0/. Changes: rasterised, cropped, resized; "
                  "grouped with other styles into a domain-labelled dataset."),
    "OFL-1.1": ("The font is licensed under the SIL Open Font License 1.1, https://openfontlicense.org. "
                "The dataset holds rasterised glyph images, not the font software."),
}


def _attribution(style: Style) -> str:
    ver = NPM.get(style.source) or ("Debian fonts-symbola 2.60-1.1" if style.key == "symbola"
                                     else f"PyPI manimgx-fonts {PYPI['manimgx-fonts']}")
    text = LICENCE_TEXT.get(style.licence, "Symbola: \"Fonts are free for any use; they may be opened, edited, "
                            "modified, regenerated, packaged and redistributed.\" (Debian copyright file)")
    return (f"{style.title}\n{'=' * len(style.title)}\n\nUsed in the clipmech emoji dataset as domain "
            f"'{style.domain}' (rasterised, cropped and resized; no other change).\n\n"
            f"Source: {style.url}\nPackage: {style.source} {ver}\nLicence: {style.licence}\n"
            f"Credit: {style.credit}\n\n{text}\n")


def write_readme(npz_path: Path) -> Path:
    """Write README.md next to the .npz: shape, styles per domain, licences, split and defaults."""
    from clipmech.utils import atomic_write_text
    with np.load(npz_path) as z:
        meta = json.loads(str(z["meta"]))
        dom, cls, split, sty = z["domain_idx"], z["class_idx"], z["split"], z["style_idx"]
    C, D = len(meta["classes"]), len(meta["domains"])
    rows = []
    for d, name in enumerate(meta["domains"]):
        per = np.bincount(cls[dom == d], minlength=C)
        styles = ", ".join(f"{s['title']} ({s['licence']}, {int((sty == k).sum())} drawings)"
                           for k, s in enumerate(meta["styles"]) if s["domain"] == name)
        rows.append(f"| {name} | {styles} | {per.min()}-{per.max()} | {int(((dom == d) & (split == 'train')).sum())} "
                    f"| {int(((dom == d) & (split == 'test')).sum())} |")
    size_mb = npz_path.stat().st_size / 1e6
    text = f"""# Embedded emoji domains dataset (`load_dataset("emoji")`)

`{npz_path.name}`: {size_mb:.2f} MB, {C} object classes x {D} domains, {len(dom)} distinct drawings of
{meta['image_size']} x {meta['image_size']} px on white (RGB uint8). Built by `clipmech data build-emoji`
(`clipmech/data/build_emoji.py`) from npm / Debian / PyPI packages; one ATTRIBUTION-<style>.txt per style.

| domain | styles (licence, drawings) | drawings per class | train | test |
|---|---|---|---|---|
{chr(10).join(rows)}

- Classes: single-codepoint emoji of the categories {', '.join(OBJECT_CATEGORIES)} drawn by >= 2 styles
  of every domain; names and keywords from CLDR 41 English annotations (Debian unicode-cldr-core).
- Split rule: {meta['split_rule']} (k = class index, styles in the table order). The loader adds
  flip/shift views of the train drawings (`load_emoji(views=16)`), so train buckets are large enough for
  the paper's ceil()-based stratified subsampling; test keeps the original drawings only.
- Natural domain: {meta['natural_domain']}. Default test domain: {meta['default_test_domain']}.
  Default C2 (15): {', '.join(meta['default_test_classes'])}
  (the paper's C2 names that exist as emoji, filled up by the smallest sha256(name)).
- Caution: Fluent Color (real) and Fluent Flat (flat) share Microsoft's shapes with Fluent 3D (real);
  flat is therefore close to real and a weak test domain.
- Fluent Color and Fluent Flat reuse the shapes of Fluent 3D (mean absolute pixel difference to
Fluent 3D / Color 5 and 14 of 255, against 38-74 between the other style pairs of a domain), so
"flat" is close to "real" and a weak test domain; "real" instances are near-duplicates.

No share-alike art (OpenMoji, EmojiOne v1, Debian's EmojiOne PNGs), no Apple / Facebook / emojify art.
"""
    return atomic_write_text(text, npz_path.parent / "README.md")


def build(sources: Path | None = None, out_dir: Path = ASSET_DIR, size: int = 40, margin: int = 2,
          min_styles: int = 2, keep_sources: bool = False) -> Path:
    """Fetch (unless `sources` given), render, select classes and write the .npz + attributions.

    Cost: ~2-3 min of CPU (13 styles x ~830 emoji rendered at 256 px); ~60 MB download.
    """
    tmp = None
    if sources is None:
        tmp = Path(tempfile.mkdtemp(prefix="clipmech-emoji-"))
        sources = fetch_sources(tmp)
    try:
        cldr = read_cldr(sources)
        keys = [k for k in candidate_keys(sources) if k in cldr]
        noto = IconifySet(_npm_dir(sources, "@iconify-json/noto"))
        noto_names = dict(noto.by_key)
        rendered = {}
        for st in STYLES:
            rendered[st.key] = render_style(st, sources, keys, cldr, noto_names, size, margin)
            print(f"  {st.key:14s} {st.domain:10s} {len(rendered[st.key]):4d} object emoji", file=sys.stderr)
    finally:
        if tmp is not None and not keep_sources:
            shutil.rmtree(tmp, ignore_errors=True)
    by_domain = {d: [s for s in STYLES if s.domain == d] for d in DOMAINS}
    keys = [k for k in keys if all(sum(k in rendered[s.key] for s in ss) >= min_styles for ss in by_domain.values())]
    names = [cldr[k][0] for k in keys]
    order = np.argsort(names, kind="stable")
    keys, names = [keys[i] for i in order], [names[i] for i in order]
    images, dom, cls, split, sty = [], [], [], [], []
    for d, dname in enumerate(DOMAINS):
        for c, k in enumerate(keys):
            avail = [s for s in by_domain[dname] if k in rendered[s.key]]
            for j, s in enumerate(avail):
                images.append(rendered[s.key][k])
                dom.append(d), cls.append(c), sty.append(STYLES.index(s))
                split.append("test" if j == c % len(avail) else "train")
    c2 = [n for n in PAPER_C2 if n in names]
    c2 += sorted((n for n in names if n not in c2), key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:15 - len(c2)]
    meta = {
        "name": "emoji", "domains": DOMAINS, "classes": names, "codepoints": keys,
        "keywords": {n: cldr[k][1] for n, k in zip(names, keys)},
        "styles": [{"key": s.key, "title": s.title, "domain": s.domain, "licence": s.licence} for s in STYLES],
        "natural_domain": "real", "default_test_domain": DEFAULT_TEST_DOMAIN,
        "default_test_classes": sorted(c2), "trim_order": ["real", "quickdraw", "painting", "sketch", "flat", "clipart"],
        "domain_terms": {"flat": ["flat icon", "vector graphic"]},
        "image_size": size, "split_rule": "test = style s_{k mod n} of the n styles drawing class k in a domain",
        "sources": {"npm": NPM, "debian": DEBIAN, "pypi": PYPI},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.stack(images), domain_idx=np.asarray(dom, np.int64),
                        class_idx=np.asarray(cls, np.int64), split=np.asarray(split),
                        style_idx=np.asarray(sty, np.int64), meta=np.asarray(json.dumps(meta, sort_keys=True)))
    from clipmech.utils import atomic_write_bytes, atomic_write_text
    written = [atomic_write_bytes(buf.getvalue(), out_dir / ASSET_NAME)]
    written += [atomic_write_text(_attribution(s), out_dir / f"ATTRIBUTION-{s.key}.txt") for s in STYLES]
    written.append(write_readme(written[0]))
    for p in written:
        p.chmod(0o644)  # package data must be world-readable (atomic writes create 0600 files)
    path = written[0]
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {len(keys)} classes x {len(DOMAINS)} domains, "
          f"{len(images)} images", file=sys.stderr)
    return path
