"""ImageNet-Captions -> the base TSV of the paper's training sets (docs/methods.md#data, #index-files).

Input: the ImageNet-Captions JSON (a list of {"filename", "wnid", "title", "tags": [...],
"description"}) and an ImageNet train folder (ROOT/train/<wnid>/<filename> or ROOT/<wnid>/<filename>).
Caption (the paper's rule): title, the tags joined by spaces, and the description, joined with "; "
after dropping empty parts; then every whitespace run (tabs and newlines included, which a TSV line
cannot hold) becomes one space and the ends are stripped.
Split (deterministic, order-free): an entry goes to validation iff the first 8 hex digits of
sha256(filename), read as an integer, are < val_fraction * 2^32; the rest is training. The paper's own
split file is not shipped (large); this rule is documented instead and stable under any reordering
or subsetting of the JSON.
Entries whose image file is missing are skipped, counted in the manifest and reported.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from clipmech.data.tsv import write_tsv
from clipmech.utils import atomic_write_json

_WS = re.compile(r"\s+")


def imagenet_caption(entry: dict) -> str:
    """The paper's caption of one ImageNet-Captions entry (module docstring)."""
    parts = [entry.get("title") or "", " ".join(entry.get("tags") or []), entry.get("description") or ""]
    return _WS.sub(" ", "; ".join(p for p in parts if p != "")).strip()


def is_val(filename: str, val_fraction: float) -> bool:
    """The documented split: sha256(filename)[:8] as an integer < val_fraction * 2^32."""
    return int(hashlib.sha256(filename.encode("utf-8")).hexdigest()[:8], 16) < val_fraction * 2**32


def build_imagenet_captions(json_path: str | Path, imagenet_root: str | Path, out: str | Path,
                            val_fraction: float = 0.05) -> dict:
    """Write the train TSV to `out`, the validation TSV to `out` with '-val' before .tsv (when
    val_fraction > 0), and a manifest `out`.json; returns the manifest. Lines keep the JSON's order.
    Cost: one JSON parse and one directory listing per class folder."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    json_path, root, out = Path(json_path), Path(imagenet_root), Path(out)
    if not json_path.is_file():
        raise FileNotFoundError(f"ImageNet-Captions JSON {json_path} not found")
    base = root / "train" if (root / "train").is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"ImageNet folder {root} not found (expected ROOT/train/<wnid>/<file> or ROOT/<wnid>/<file>)")
    entries = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or any(not isinstance(e, dict) or "filename" not in e for e in entries):
        raise ValueError(f"{json_path}: expected a list of objects with 'filename', 'wnid', 'title', 'tags', "
                         "'description' (the ImageNet-Captions release)")
    listing: dict[str, set[str]] = {}
    lines: dict[str, list[str]] = {"train": [], "val": []}
    missing, empty = [], 0
    for e in entries:
        wnid = e.get("wnid") or e["filename"].split("_")[0]
        if wnid not in listing:
            folder = base / wnid
            listing[wnid] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if e["filename"] not in listing[wnid]:
            missing.append(f"{wnid}/{e['filename']}")
            continue
        text = imagenet_caption(e)
        if not text:
            empty += 1
            continue
        path = (base / wnid / e["filename"]).resolve()
        lines["val" if is_val(e["filename"], val_fraction) else "train"].append(f"{path}\t{text}")
    outputs = {"train": out, "val": out.with_name(out.stem + "-val.tsv")}
    manifest = {"json": str(json_path.resolve()), "imagenet": str(base.resolve()), "n_entries": len(entries),
                "n_train": len(lines["train"]), "n_val": len(lines["val"]), "val_fraction": val_fraction,
                "split_rule": "val iff int(sha256(filename)[:8], 16) < val_fraction * 2**32",
                "caption_rule": "'; '.join(non-empty of title, ' '.join(tags), description), whitespace runs -> ' '",
                "n_missing_images": len(missing), "missing_first": missing[:10], "n_empty_captions": empty,
                "outputs": {k: str(v) for k, v in outputs.items() if k == "train" or val_fraction > 0}}
    write_tsv(lines["train"], outputs["train"])
    if val_fraction > 0:
        write_tsv(lines["val"], outputs["val"])
    atomic_write_json(manifest, out.with_suffix(".json"))
    return manifest
