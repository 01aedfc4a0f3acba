"""TSV export in open_clip_train's CSV format (docs/methods.md#index-files) and base-TSV reading.

Format: tab-separated, header `filepath\\ttitle`, one `<absolute image path>\\t<caption>` line per
sample; `open_clip_train.data.CsvDataset(path, transform, "filepath", "title")` reads it. Files are
written atomically and byte-identically for identical inputs (no timestamps, fixed order).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from clipmech.utils import atomic_write_json, atomic_write_text, file_hash

HEADER = "filepath\ttitle"


def read_base_tsv(path: str | Path) -> tuple[list[str], dict]:
    """Lines '<path>\\t<caption>' of a base image-text TSV (header with 'filepath' and 'title'
    columns, any order, extra columns dropped), plus {path, file_hash, n_lines} for the manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base TSV not found: {path}")
    text = path.read_text(encoding="utf-8")
    rows = text.splitlines()
    if not rows:
        raise ValueError(f"base TSV {path} is empty; it needs a header 'filepath<TAB>title'")
    cols = rows[0].split("\t")
    if "filepath" not in cols or "title" not in cols:
        raise ValueError(f"base TSV {path}: header {rows[0]!r} lacks the columns 'filepath' and 'title' "
                         "(open_clip_train's csv-img-key / csv-caption-key defaults)")
    fi, ti = cols.index("filepath"), cols.index("title")
    lines = []
    for n, row in enumerate(rows[1:], start=2):
        if not row.strip():
            continue
        parts = row.split("\t")
        if len(parts) != len(cols):
            raise ValueError(f"base TSV {path}, line {n}: {len(parts)} tab-separated fields, header has {len(cols)}")
        lines.append(f"{parts[fi]}\t{parts[ti]}")
    return lines, {"path": str(path.resolve()), "file_hash": file_hash(path), "n_lines": len(lines)}


def materialise_images(dataset, indices: Sequence[int], image_dir: Path) -> list[str]:
    """Write the in-memory images `dataset.images[indices]` as PNG files under image_dir/{domain}/
    (skipping existing ones); their absolute paths, aligned with `indices`."""
    paths = []
    for i in indices:
        i = int(i)
        p = image_dir / dataset.domains[dataset.domain_idx[i]] / f"{i:06d}.png"
        if not p.exists():
            # temp name + rename: a crash never leaves a truncated PNG; no per-file fsync, which
            # would cost ~5 ms x thousands of files
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            Image.fromarray(dataset.images[i]).save(tmp, format="PNG")
            os.replace(tmp, p)
        paths.append(str(p.resolve()))
    return paths


def write_tsv(lines: Sequence[str], path: Path, manifest: dict | None = None) -> Path:
    """Write the header then the '<path>\\t<caption>' `lines` to `path` atomically; `manifest`, if
    given, to `path` with .json."""
    out = atomic_write_text("\n".join([HEADER, *lines]) + "\n", path)
    if manifest is not None:
        atomic_write_json(manifest, path.with_suffix(".json"))
    return out


class BaseLinesView:
    """Map-style dataset over base TSV lines yielding (image, caption, -1, -1)."""

    def __init__(self, lines: list[str], transform: Callable):
        self.items = [line.split("\t", 1) for line in lines]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        path, caption = self.items[j]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as err:
            raise RuntimeError(f"cannot read base image {path}: {err}") from err
        return self.transform(image), caption, -1, -1


def read_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """(paths, captions) of a TSV written by `write_tsv` (header checked)."""
    rows = Path(path).read_text(encoding="utf-8").splitlines()
    if not rows or rows[0] != HEADER:
        raise ValueError(f"{path}: first line must be {HEADER!r}")
    pairs = [r.split("\t", 1) for r in rows[1:] if r]
    return [p for p, _ in pairs], [c for _, c in pairs]

