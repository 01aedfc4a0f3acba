"""TSV export: open_clip_train reads it, the CLI is byte-identical on re-run, base lines merge."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipmech.cli import main
from clipmech.data import DomainNet, build_mixture
from clipmech.data.synthetic import write_fake_domainnet
from clipmech.data.tsv import read_tsv


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fake_domainnet(tmp_path_factory.mktemp("dn"))


def test_open_clip_train_reads_tsv(root, tmp_path):
    from open_clip_train.data import CsvDataset
    from torchvision import transforms
    m = build_mixture(DomainNet(root), "cg_high", test_domain="sketch", test_classes=["axe"])
    path = m.to_tsv(tmp_path / m.filename())
    assert path.name == "dn-captions-train-lso-cipqrs-nosketchclasses.tsv"
    csv = CsvDataset(str(path), transforms.ToTensor(), "filepath", "title", tokenizer=lambda texts: texts)
    assert len(csv) == len(m.indices)
    img, text = csv[3]
    assert img.shape == (3, 8, 8) and text == m.captions[3]
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["id"] == m.id and manifest["n_dataset_samples"] == len(m.indices)


def _cli(root, out, *extra):
    return main(["data", "mixture", "--domainnet", str(root), "--setup", "cg_high", "--test-domain", "quickdraw",
                 "--test-classes", "axe,banana", "--out", str(out), *extra])


def test_cli_byte_identical_with_base(root, tmp_path):
    base = tmp_path / "base.tsv"
    base.write_text("title\tfilepath\textra\nfirst caption\t/data/a.jpg\tx\nsecond\t/data/b.jpg\ty\n")
    a, b = tmp_path / "a" / "mix.tsv", tmp_path / "b" / "mix.tsv"
    assert _cli(root, a, "--base", str(base), "--allow-p", "0.4") == 0
    assert _cli(root, b, "--base", str(base), "--allow-p", "0.4") == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".json").read_bytes() == b.with_suffix(".json").read_bytes()
    paths, caps = read_tsv(a)
    assert paths[:2] == ["/data/a.jpg", "/data/b.jpg"] and caps[:2] == ["first caption", "second"]
    man = json.loads(a.with_suffix(".json").read_text())
    assert man["n_base_samples"] == 2 and man["id"] == "lso-cipqrs-noquickdrawclasses-allow0.4"
    assert len(paths) == 2 + man["n_dataset_samples"]
    # a different seed changes the captions, hence the bytes
    c = tmp_path / "c" / "mix.tsv"
    assert _cli(root, c, "--base", str(base), "--allow-p", "0.4", "--seed", "7") == 0
    assert c.read_bytes() != a.read_bytes()


def test_cli_folder_out_uses_paper_name(root, tmp_path, capsys):
    assert _cli(root, str(tmp_path) + "/", "--split", "val") == 0
    assert (tmp_path / "dn-captions-val-lso-cipqrs-noquickdrawclasses.tsv").exists()
    assert main(["data", "summary", str(root)]) == 0
    assert "quickdraw" in capsys.readouterr().out


def test_cli_errors_are_clear(root, tmp_path, capsys):
    assert _cli(root / "missing", tmp_path / "x.tsv") == 1
    assert "neither an embedded dataset" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\tcaption\n/x.jpg\thello\n")
    assert _cli(root, tmp_path / "x.tsv", "--base", str(bad)) == 1
    assert "'filepath' and 'title'" in capsys.readouterr().err


def test_in_memory_images_are_materialised(tmp_path):
    from clipmech.data.dataset import DomainDataset
    rng = np.random.default_rng(0)
    ds = DomainDataset("toy", ["real", "sketch"], ["a", "b"], domain_idx=[0, 0, 1, 1, 0, 1],
                       class_idx=[0, 1, 0, 1, 0, 1], split=["train"] * 4 + ["test"] * 2,
                       images=rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8))
    m = build_mixture(ds, "pseudo_high", test_domain="sketch", test_classes=["b"])
    path = m.to_tsv(tmp_path / "toy.tsv")
    paths, _ = read_tsv(path)
    from PIL import Image
    for p, i in zip(paths, m.indices):
        assert np.array_equal(np.asarray(Image.open(p)), ds.images[i])


def test_mixture_torch_dataset_puts_base_first(root, tmp_path):
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "b0.png")
    base = tmp_path / "base.tsv"
    base.write_text(f"filepath\ttitle\n{tmp_path / 'b0.png'}\ta red square\n")
    m = build_mixture(DomainNet(root), "cg_low", test_domain="sketch", test_classes=["axe"], base=base)
    ds = m.torch_dataset(to_tensor)
    assert len(ds) == len(m) == 1 + len(m.indices)
    img, cap, k, d = ds[0]
    assert cap == "a red square" and (k, d) == (-1, -1) and img[0].min() == 1.0
    img, cap, k, d = ds[1]
    assert cap == m.captions[0] and k == m.dataset.class_idx[m.indices[0]]
    assert m.filename() == f"combined-captions-train-{m.id}.tsv"
    # a CC12M / CC3M base gets the paper's web-data name (paper.md §5)
    for web in ("cc12m", "CC3M"):
        renamed = tmp_path / f"{web}_train.tsv"
        renamed.write_text(base.read_text())
        m = build_mixture(DomainNet(root), "cg_low", test_domain="sketch", test_classes=["axe"], base=renamed)
        assert m.filename() == f"{web.lower()}-train-{m.id}.tsv"
