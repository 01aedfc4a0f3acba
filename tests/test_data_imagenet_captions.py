"""`clipmech data imagenet-captions`: the paper's caption rule (paper.md §3.3) and the documented split."""
import hashlib
import json

import pytest
from PIL import Image

from clipmech.cli import main
from clipmech.data.imagenet_captions import build_imagenet_captions, imagenet_caption, is_val
from clipmech.data.tsv import read_base_tsv


def test_caption_rule():
    assert imagenet_caption({"title": "A  dog", "tags": ["pet", "good boy"], "description": "on\tgrass\n"}) == \
        "A dog; pet good boy; on grass"
    assert imagenet_caption({"title": "", "tags": [], "description": "only this"}) == "only this"  # empties dropped
    assert imagenet_caption({"title": "t", "tags": ["a"], "description": ""}) == "t; a"
    assert imagenet_caption({"title": " ", "tags": [], "description": "d"}) == "; d"  # a blank part is not empty


def test_split_rule_boundaries():
    h = int(hashlib.sha256(b"n0_1.JPEG").hexdigest()[:8], 16)
    assert is_val("n0_1.JPEG", (h + 1) / 2**32) and not is_val("n0_1.JPEG", h / 2**32)  # strict <
    assert not is_val("n0_1.JPEG", 0.0)


def test_cli_help_documents_the_split(capsys):
    with pytest.raises(SystemExit):
        main(["data", "imagenet-captions", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "int(sha256(file name)[:8], 16) < FRACTION * 2**32" in text and "paper's own split file" in text


def test_builder_and_cli(tmp_path, capsys):
    root = tmp_path / "imagenet" / "train"
    entries = []
    for k, wnid in enumerate(["n01440764", "n01443537"]):
        (root / wnid).mkdir(parents=True)
        for j in range(20):
            name = f"{wnid}_{j}.JPEG"
            if j != 19:
                Image.new("RGB", (4, 4)).save(root / wnid / name)
            entries.append({"filename": name, "wnid": wnid, "title": f"photo {j}", "tags": ["fish"] * (j % 2),
                            "description": "" if j % 3 else "a fish"})
    entries.append({"filename": "n01440764_99.JPEG", "wnid": "n01440764", "title": "", "tags": [], "description": ""})
    Image.new("RGB", (4, 4)).save(root / "n01440764" / "n01440764_99.JPEG")
    (tmp_path / "caps.json").write_text(json.dumps(entries))
    out = tmp_path / "out" / "imagenet_captions.tsv"
    m = build_imagenet_captions(tmp_path / "caps.json", tmp_path / "imagenet", out, val_fraction=0.3)
    assert m["n_missing_images"] == 2 and m["n_empty_captions"] == 1 and m["n_train"] + m["n_val"] == 38
    train, _ = read_base_tsv(out)
    val, _ = read_base_tsv(out.with_name("imagenet_captions-val.tsv"))
    want_val = [e for e in entries[:-1] if not e["filename"].endswith("_19.JPEG") and is_val(e["filename"], 0.3)]
    assert [line.split("\t")[1] for line in val] == [imagenet_caption(e) for e in want_val] and 0 < len(val) < 38
    want_train = [e for e in entries[:-1] if not e["filename"].endswith("_19.JPEG") and not is_val(e["filename"], 0.3)]
    assert train == [f"{(root / e['wnid'] / e['filename']).resolve()}\t{imagenet_caption(e)}" for e in want_train]
    assert main(["data", "imagenet-captions", "--json", str(tmp_path / "caps.json"), "--imagenet",
                 str(tmp_path / "imagenet"), "--out", str(tmp_path / "cli.tsv")]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 entries without an image file" in printed and "1 with an empty caption" in printed
    assert read_base_tsv(tmp_path / "cli.tsv")[1]["n_lines"] + read_base_tsv(tmp_path / "cli-val.tsv")[1]["n_lines"] == 38
    with pytest.raises(ValueError, match="val_fraction"):
        build_imagenet_captions(tmp_path / "caps.json", tmp_path / "imagenet", out, val_fraction=1.0)
