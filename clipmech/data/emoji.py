"""The embedded "emoji domains" dataset: real emoji artwork in six DomainNet-like domains.

Loaded from `clipmech/data/assets/emoji_domains.npz` (built by `clipmech data build-emoji`, see
`build_emoji.py` for the styles per domain, licences and the in-domain split rule). No network.
Each emoji style draws a class once, so a (domain, class) bucket holds only 1-3 drawings. The
paper's stratified subsampling keeps ceil(rho * n) per bucket, which degenerates for n = 1 (every
bucket keeps its sample and the trimming then deletes whole domains). The loader therefore adds
`views - 1` deterministic views (horizontal flip and small shifts on white, see `train_views`)
of every TRAIN drawing, so a train bucket holds
n_train_styles x views samples; the test split keeps only the original drawings. Sample order
is domain, view, class, style: the first samples of a bucket are the distinct drawings.

Default test domain: quickdraw (filled high-contrast silhouettes). A leave-one-domain-out check
(supervised 3-layer CNN, 459-way, 10 epochs, views=4, one seed; in-domain "test" is an unseen
style of a seen domain) gave held-out / seen-domain test accuracy: quickdraw 7.0 / 36.0 %,
sketch 6.5 / 34.2 %, painting 28.1 / 31.6 %, clipart 29.8 / 30.2 %, flat 32.5 / 26.7 %,
real 39.7 / 19.1 % (chance 0.2 %): quickdraw and sketch show the clear DG gap; flat and real
share Fluent shapes and do not. Default C2: the paper's C2 names that exist as emoji, filled up
to 15 by the smallest sha256(class name).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from clipmech.data.dataset import DomainDataset

ASSET = Path(__file__).parent / "assets" / "emoji_domains.npz"


VIEWS = 16
# view v of a drawing: horizontal flip for odd v, then a shift by _SHIFTS[v // 2] pixels (dx, dy)
_SHIFTS = [(0, 0), (2, 1), (-2, -1), (1, -2), (-1, 2), (3, 0), (0, -3), (-3, 2)]
_PAD = 3


def view(images: np.ndarray, v: int) -> np.ndarray:
    """uint8[N, S, S, 3]: view v of each image: flipped horizontally if v is odd, drawing shifted
    by _SHIFTS[v // 2] px (dx, dy) on white. Cheap (array slicing)."""
    return np.ascontiguousarray(_view_of_padded(_pad(images), v))


def _pad(images: np.ndarray) -> np.ndarray:
    return np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)), constant_values=255)


def _view_of_padded(padded: np.ndarray, v: int) -> np.ndarray:
    """View v as a strided (not copied) window of white-padded images."""
    if not 0 <= v < 2 * len(_SHIFTS):
        raise ValueError(f"view {v} outside 0..{2 * len(_SHIFTS) - 1}")
    h, w = padded.shape[1] - 2 * _PAD, padded.shape[2] - 2 * _PAD
    dx, dy = _SHIFTS[v // 2]
    src = padded[:, _PAD - dy:_PAD - dy + h, _PAD - dx:_PAD - dx + w]
    return src[:, :, ::-1] if v % 2 else src


def train_views(images: np.ndarray, views: int) -> np.ndarray:
    """uint8[N, views, S, S, 3]: views 0..views-1 of each image (view 0 = the image)."""
    return np.stack([view(images, v) for v in range(views)], axis=1)


@lru_cache(maxsize=2)
def _load_arrays(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("images", "domain_idx", "class_idx", "split", "style_idx")}
        meta = json.loads(str(z["meta"]))
    arrays["images"].setflags(write=False)  # shared between loads through the cache
    return arrays, meta


@lru_cache(maxsize=4)
def _expanded(path: str, views: int) -> tuple[dict, dict]:
    a, meta = _load_arrays(path)
    train = np.flatnonzero(a["split"] == "train")
    test = np.flatnonzero(a["split"] == "test")
    src = np.concatenate([np.repeat(train, views), test])  # stored drawing of each sample
    vidx = np.concatenate([np.tile(np.arange(views), len(train)), np.full(len(test), -1)])
    # sample order: domain, split (train first), view, class, style
    order = np.lexsort((a["style_idx"][src], a["class_idx"][src], vidx, a["split"][src] == "test",
                        a["domain_idx"][src]))
    src, vidx = src[order], vidx[order]
    images = np.empty((len(src),) + a["images"].shape[1:], dtype=np.uint8)
    images[vidx < 0] = a["images"][src[vidx < 0]]
    pos_in_train = np.searchsorted(train, src)  # row of each train sample's drawing in `train`
    padded = _pad(a["images"][train])
    for v in range(views):
        sel = np.flatnonzero(vidx == v)
        images[sel] = _view_of_padded(padded, v)[pos_in_train[sel]]
    images.setflags(write=False)
    out = {"images": images, "domain_idx": a["domain_idx"][src], "class_idx": a["class_idx"][src],
           "split": a["split"][src].astype("<U5"), "style_idx": a["style_idx"][src], "view_idx": np.maximum(vidx, 0)}
    return out, meta


def load_emoji(path: str | Path = ASSET, views: int = VIEWS) -> DomainDataset:
    """The embedded emoji dataset as a DomainDataset (images uint8[N, S, S, 3] in memory; first
    call ~1-2 s, then cached per process). views: samples per train drawing (see module doc).

    Extras: `.style_idx` / `.view_idx` (np.int64[N]); `.info["styles"]` (list of dicts: key, title,
    domain, licence; indexed by style_idx), `.info["codepoints"]` (hex per class), `.info["views"]`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embedded emoji dataset missing at {path}; rebuild it with "
                                "`clipmech data build-emoji` (needs npm, apt-get and the build-data extra)")
    if not 1 <= views <= 2 * len(_SHIFTS):
        raise ValueError(f"views={views} must be in 1..{2 * len(_SHIFTS)}")
    arrays, meta = _expanded(str(path), int(views))
    ds = DomainDataset(
        "emoji", meta["domains"], meta["classes"], arrays["domain_idx"], arrays["class_idx"],
        arrays["split"], images=arrays["images"], keywords=meta["keywords"],
        natural_domain=meta["natural_domain"], default_test_domain=meta["default_test_domain"],
        default_test_classes=meta["default_test_classes"], trim_order=meta["trim_order"],
        domain_terms=meta["domain_terms"],
        extras={"style_idx": arrays["style_idx"], "view_idx": arrays["view_idx"]},
        info={"styles": meta["styles"], "codepoints": meta["codepoints"], "views": int(views),
              "image_size": meta["image_size"], "split_rule": meta["split_rule"]})
    return ds
