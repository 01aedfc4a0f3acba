"""ImageNet-Sketch lines and the paper's sketch add / mix mixtures (paper.md §4)."""
import numpy as np
import pytest
from PIL import Image

from clipmech.data import DomainNet, build_mixture
from clipmech.data.imagenet_sketch import KEEP, add_imagenet_sketch, imagenet_sketch_lines
from clipmech.data.mixtures import with_in_sketches
from clipmech.data.synthetic import fake_counts, write_fake_domainnet
from clipmech.data.tsv import read_tsv

# ImageNet class index -> images: tench, goldfish, ant, the two elephants, zebra, banana
IMAGES = {0: 3, 1: 2, 310: 2, 385: 1, 386: 1, 340: 2, 954: 2}
CLASSES = ("axe", "banana", "zebra", "bear", "camel", "candle", "dog", "flower", "guitar", "hammer", "lion")


@pytest.fixture(scope="module")
def in_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet-sketch")
    for k in range(1000):
        folder = root / "sketch" / f"n{k:08d}"
        folder.mkdir(parents=True)
        for j in range(IMAGES.get(k, 0)):
            Image.new("RGB", (4, 4), (k % 256, j, 0)).save(folder / f"sketch_{j}.JPEG")
    return root


@pytest.fixture(scope="module")
def dn(tmp_path_factory):
    return DomainNet(write_fake_domainnet(tmp_path_factory.mktemp("dn"), fake_counts(classes=CLASSES)))


def test_lines_filter_captions_and_determinism(in_root):
    lines, info = imagenet_sketch_lines(in_root, ["ant", "banana"])
    names = [line.split("\t")[1] for line in lines]
    # the paper's substring filter: "ant" also removes both elephants; banana goes, zebra stays
    assert info["n_lines"] == len(lines) == 3 + 2 + 2
    assert info["excluded_classes"] == ["African bush elephant", "Asian elephant", "ant", "banana"]
    assert all(any(c in n for c in ("tench", "goldfish", "zebra")) for n in names)
    assert all(line.split("\t")[0].endswith(".JPEG") for line in lines)
    assert imagenet_sketch_lines(in_root, ["ant", "banana"]) == (lines, info)
    words, winfo = imagenet_sketch_lines(in_root, ["ant", "banana"], word_match=True)
    assert winfo["excluded_classes"] == ["ant", "banana"] and len(words) == 7 + 2
    custom, _ = imagenet_sketch_lines(in_root, [], templates=["a doodle of {C}"])
    assert {line.split("\t")[1] for line in custom} >= {"a doodle of tench", "a doodle of zebra"}


def test_lines_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imagenet_sketch_lines(tmp_path / "nope", [])
    (tmp_path / "n00000001").mkdir()
    with pytest.raises(ValueError, match="1 WordNet-id class folders .* expected the 1000"):
        imagenet_sketch_lines(tmp_path, [])


def test_add_variant_keeps_the_size_and_writes_the_lines(dn, in_root, tmp_path):
    for setup in ("natural_only", "lod", "cg_high"):
        m = build_mixture(dn, setup, test_domain="sketch", test_classes=["axe"])
        out = add_imagenet_sketch(m, in_root)
        assert len(out) == len(m) and out.id == m.id + "-with-in-sketches"
        assert len(out.extra_lines) == 3 + 2 + 2 + 1 + 1  # zebra and banana are DomainNet classes here
        assert len(m.indices) - len(out.indices) == len(out.extra_lines)
        assert set(out.indices) <= set(m.indices)
        assert out.manifest["in_sketch"]["variant"] == "add" and out.manifest["n_extra_samples"] == len(out.extra_lines)
    paths, caps = read_tsv(out.to_tsv(tmp_path / out.filename()))
    assert len(paths) == len(out) and paths[0] == out.extra_lines[0].split("\t")[0]
    from torchvision.transforms.functional import to_tensor
    view = out.torch_dataset(to_tensor)  # what the trainer iterates: IN-Sketch images first, label -1
    img, cap, k, d = view[0]
    assert len(view) == len(out) and (k, d) == (-1, -1) and cap == caps[0] and img.shape == (3, 4, 4)
    with pytest.raises(ValueError, match="applies to setups"):
        add_imagenet_sketch(build_mixture(dn, "cg_low", test_domain="sketch", test_classes=["axe"]), in_root)


def test_mix_variants_are_nested_and_only_touch_what_the_paper_says(dn, in_root):
    m = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=["axe"])
    lines, info = imagenet_sketch_lines(in_root, dn.classes)
    s = dn.domain_index("sketch")
    before = m.counts()
    kept = {}
    for keep in KEEP:
        out = with_in_sketches(m, lines, info, keep=keep)
        after = out.counts()
        kept[keep] = set(out.manifest["in_sketch"]["kept_c1_classes"])
        c1 = [c for c in dn.classes if c != "axe"]
        frac = KEEP[keep]
        assert len(kept[keep]) == (1 if frac is None else max(1, int(frac * len(c1) + 1e-9)))
        for j, c in enumerate(dn.classes):  # the test domain keeps exactly the chosen C1 classes
            assert after[s, j] == (before[s, j] if c in kept[keep] else 0)
        others = np.arange(len(dn.domains)) != s
        assert before[others].sum() - after[others].sum() == len(lines)  # as many as were added
        assert out.id.endswith(f"-with-in-sketches-{keep}")
    assert kept["one"] <= kept["onep"] <= kept["fivep"] <= kept["tenp"] <= kept["twentyfivep"] <= kept["thirtyp"] <= kept["fiftyp"]
    with pytest.raises(KeyError, match="fiftyp"):
        with_in_sketches(m, lines, info, keep="fifty")
    with pytest.raises(ValueError, match="applies to setups"):
        with_in_sketches(build_mixture(dn, "lod", test_domain="sketch", test_classes=["axe"]), lines, info, keep="one")


def test_cli_and_training_config_build_the_same_variant(dn, in_root, tmp_path, capsys):
    from clipmech.cli import main
    from clipmech.train.config import load_config
    from clipmech.train.trainer import build_mixture_from_config
    out = tmp_path / "mix"
    args = ["data", "mixture", "--domainnet", dn.root, "--setup", "cg_high", "--test-domain", "sketch",
            "--test-classes", "axe", "--in-sketch", str(in_root), "--in-sketch-keep", "tenp", "--out", f"{out}/"]
    assert main(args) == 0
    assert "+ 9 ImageNet-Sketch lines" in capsys.readouterr().out
    tsv, = out.glob("*.tsv")
    assert tsv.name == "dn-captions-train-lso-cipqrs-nosketchclasses-with-in-sketches-tenp.tsv"
    cfg = load_config({"data": {"dataset": dn.root}, "mixture": {"setup": "cg_high", "test_domain": "sketch",
                       "test_classes": ["axe"], "in_sketch": str(in_root), "in_sketch_keep": "tenp"}})
    m = build_mixture_from_config(cfg)
    assert m.manifest["content_hash"] == __import__("json").loads(tsv.with_suffix(".json").read_text())["content_hash"]
    assert main(args[:-6] + ["--in-sketch-keep", "one", "--out", f"{out}/"]) == 1
    assert "--in-sketch-keep needs --in-sketch" in capsys.readouterr().err
    cfg["mixture"]["in_sketch"] = None
    with pytest.raises(ValueError, match="in_sketch_keep needs in_sketch"):
        build_mixture_from_config(cfg)
