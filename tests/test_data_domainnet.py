"""DomainNet loader: layout, class order, counts, subset, torch view, bad input."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from clipmech.data import DomainNet, load_dataset
from clipmech.data.domainnet import SkippedSamplesWarning
from clipmech.data.synthetic import fake_counts, write_fake_domainnet


@pytest.fixture()
def root(tmp_path):
    return write_fake_domainnet(tmp_path / "dn")


def test_layout_classes_counts(root):
    ds = load_dataset(root)
    assert ds.domains == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    # case-insensitive alphabetical ids, '_' -> ' ', '-' kept
    assert ds.classes == ["aircraft carrier", "axe", "banana", "teddy-bear", "The Eiffel Tower", "zebra"]
    expected = np.zeros((6, 6), np.int64)
    for (dom, cls, split), n in fake_counts().items():
        if split == "train":
            expected[ds.domain_index(dom), ds.class_index(cls)] = n
    assert np.array_equal(ds.counts("train"), expected)
    assert ds.counts()[ds.domain_index("painting"), ds.class_index("zebra")] == 0  # painting lacks a class
    assert ds.class_index("The_Eiffel_Tower") == ds.class_index("The Eiffel Tower") == 4
    assert "painting" in ds.summary() and "train" in ds.summary()
    assert ds.source_key(0).startswith("clipart/")


def test_file_order_and_torch_view(root):
    ds = DomainNet(root)
    first = (root / "clipart_train.txt").read_text().split()[0]
    assert ds.sources[0] == str(root.resolve() / first)
    sub = ds.subset(ds.indices("test", domains=["sketch"]))
    assert len(sub) == ds.counts("test")[5].sum() and set(sub.domain_idx.tolist()) == {5}
    img, cap, k, d = sub.torch_dataset(indices=[0])[0]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 8, 8)
    assert cap == sub.classes[k] and d == 5


def test_missing_domain_folder_names_path(root):
    shutil.rmtree(root / "quickdraw")
    with pytest.raises(FileNotFoundError, match=str(root / "quickdraw")):
        DomainNet(root)


def test_missing_split_file_names_path(root):
    (root / "sketch_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="sketch_test.txt"):
        DomainNet(root)


def test_listed_missing_file_is_skipped_and_reported(root):
    lines = (root / "real_train.txt").read_text().splitlines()
    gone = [lines[0].split()[0], lines[3].split()[0]]
    for rel in gone:
        (root / rel).unlink()
    with pytest.warns(SkippedSamplesWarning, match=r"skipped 2 listed samples.*" + gone[0]):
        ds = DomainNet(root)
    assert [p for p, _ in ds.skipped] == [str(root.resolve() / g) for g in gone]
    assert len(ds) == sum(fake_counts().values()) - 2


def test_corrupt_image_skipped_with_verify_open(root):
    rel = (root / "clipart_test.txt").read_text().split()[0]
    (root / rel).write_bytes(b"not an image")
    with pytest.warns(SkippedSamplesWarning, match=r"skipped 1 .*unreadable"):
        ds = DomainNet(root, verify="open")
    assert len(ds) == sum(fake_counts().values()) - 1
    # without the header check it is listed, and reading it names the file and the fix
    fast = DomainNet(root)
    i = fast.sources.index(str(root.resolve() / rel))
    with pytest.raises(RuntimeError, match="rerun with --verify decode"):
        fast.load_image(i)


def test_truncated_image_passes_the_header_check_and_fails_decode(root):
    from PIL import Image
    rel = (root / "clipart_test.txt").read_text().split()[0]
    Image.effect_noise((64, 64), 40).convert("RGB").save(root / rel, format="PNG")  # noise: no compression
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 2])
    assert len(DomainNet(root, verify="header")) == sum(fake_counts().values())  # header still parses
    with pytest.warns(SkippedSamplesWarning, match=r"skipped 1 .*unreadable"):
        ds = DomainNet(root, verify="decode")
    assert str(root.resolve() / rel) not in ds.sources


def test_label_mismatch_and_bad_line(root):
    txt = root / "real_test.txt"
    lines = txt.read_text().splitlines()
    txt.write_text("\n".join([lines[0].rsplit(" ", 1)[0] + " 99", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="label 99"):
        DomainNet(root)
    txt.write_text("real/nonexistent_class/x.png 0\n")
    with pytest.raises(ValueError, match="real_test.txt, line 1"):
        DomainNet(root)


def test_load_dataset_bad_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji"):
        load_dataset(tmp_path / "nope")
