"""ImageNet-Sketch lines and the paper's sketch add / mix mixtures (paper.md §3.4, §4)."""
import json
import random

import numpy as np
import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from clipmech.data import DomainNet, build_mixture
from clipmech.data.imagenet_mapping import PAPER_ASSETS
from clipmech.data.imagenet_sketch import KEEP, add_imagenet_sketch, imagenet_sketch_lines, with_in_sketches
from clipmech.data.synthetic import fake_counts, write_fake_domainnet
from clipmech.data.tsv import read_tsv

# ImageNet class index -> images: tench, goldfish, ant, the two elephants, zebra, banana (all mapped to
# DomainNet), axolotl, terrapin (unmapped), sea lion, praying mantis (unmapped, but contain "lion", "ant")
IMAGES = {0: 3, 1: 2, 310: 2, 385: 1, 386: 1, 340: 2, 954: 2, 29: 2, 36: 1, 150: 1, 315: 1}
CLASSES = ("axe", "banana", "zebra", "bear", "camel", "candle", "dog", "flower", "guitar", "hammer", "lion")


def _write_in_sketch(root, images):
    for k in range(1000):
        folder = root / "sketch" / f"n{k:08d}"
        folder.mkdir(parents=True)
        for j in range(images.get(k, 0)):
            Image.new("RGB", (4, 4), (k % 256, j, 0)).save(folder / f"sketch_{j}.JPEG")
    return root


@pytest.fixture(scope="module")
def in_root(tmp_path_factory):
    return _write_in_sketch(tmp_path_factory.mktemp("imagenet-sketch"), IMAGES)


def test_mapping_filter_keeps_the_papers_514_classes(tmp_path):
    """paper.md §4: a sketch goes when its caption holds the OpenAI name of any of the 450 ImageNet
    classes the mapping shares with DomainNet (case-sensitive substring) -> 514 classes stay.
    Re-derived here from the mapping file and the 21 templates, on one image per class folder."""
    root = _write_in_sketch(tmp_path, {k: 1 for k in range(1000)})
    lines, info = imagenet_sketch_lines(root)
    mapping = json.loads((PAPER_ASSETS / "in_to_dn_mapping.json").read_text())
    shared = {k for ks in mapping.values() if ks for k in ks}
    templates = (PAPER_ASSETS / "in_sketch_templates.txt").read_text().splitlines()
    assert len(shared) == 450 and len(templates) == 21
    shared_names = [IMAGENET_CLASSNAMES[k] for k in shared]
    rng, want = random.Random(42), []  # the paper's stream: template, then the period coin
    for k, name in enumerate(IMAGENET_CLASSNAMES):
        text = rng.choice(templates).format(name)
        text = text if rng.random() < 0.5 else text[:-1]
        if not any(s in text for s in shared_names):
            want.append(text)
    assert [line.split("\t")[1] for line in lines] == want
    assert info["n_classes_kept"] == len(want) == 514 and info["filter"] == "mapping"
    assert "ant" in info["excluded_classes"] and "African bush elephant" in info["excluded_classes"]  # "ant" inside
    assert "axolotl" not in info["excluded_classes"] and "tench" in info["excluded_classes"]
    # case-sensitive: a shared name ("tench") in a template drops everything, "Tench" nothing more
    assert imagenet_sketch_lines(root, templates=["{} Tench."])[1]["n_classes_kept"] == 514
    assert imagenet_sketch_lines(root, templates=["{} tench."])[1]["n_classes_kept"] == 0
    substring, sinfo = imagenet_sketch_lines(root, sorted(mapping), filter="dn_substring")
    assert sinfo["n_classes_kept"] == 620  # the first-reading filter paper.md calls wrong


@pytest.fixture(scope="module")
def dn(tmp_path_factory):
    return DomainNet(write_fake_domainnet(tmp_path_factory.mktemp("dn"), fake_counts(classes=CLASSES)))


def test_lines_filter_captions_and_determinism(in_root):
    lines, info = imagenet_sketch_lines(in_root, ["ant", "banana"], filter="dn_substring")
    names = [line.split("\t")[1] for line in lines]
    # the DomainNet-name substring filter: "ant" also removes both elephants and the mantis; banana goes
    assert info["n_lines"] == len(lines) == 3 + 2 + 2 + 2 + 1 + 1
    assert info["excluded_classes"] == ["ant", "praying mantis", "Asian elephant", "African bush elephant", "banana"]
    assert all(any(c in n for c in ("tench", "goldfish", "zebra", "axolotl", "terrapin", "sea lion")) for n in names)
    assert all(line.split("\t")[0].endswith(".JPEG") for line in lines)
    assert imagenet_sketch_lines(in_root, ["ant", "banana"], filter="dn_substring") == (lines, info)
    words, winfo = imagenet_sketch_lines(in_root, ["ant", "banana"], filter="dn_words")
    assert winfo["excluded_classes"] == ["ant", "banana"] and len(words) == 18 - 4
    # the paper's filter: only the unmapped axolotl and terrapin stay; sea lion and mantis hold shared names
    paper, pinfo = imagenet_sketch_lines(in_root)
    assert pinfo["n_lines"] == len(paper) == 3 and pinfo["n_classes_kept"] == 2
    assert {line.split("\t")[1].rstrip(".").split()[-1] for line in paper} <= {"axolotl", "terrapin", "sketch",
                                                                                  "drawing", "image"}
    custom, _ = imagenet_sketch_lines(in_root, templates=["a doodle of {}"])
    assert {line.split("\t")[1] for line in custom} == {"a doodle of axolotl", "a doodle of terrapin"}
    with pytest.raises(ValueError, match="'{}'"):
        imagenet_sketch_lines(in_root, templates=["a doodle"])
    with pytest.raises(KeyError, match="mapping"):
        imagenet_sketch_lines(in_root, filter="maping")


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
        assert len(out.extra_lines) == 3  # axolotl x 2, terrapin
        assert len(m.indices) - len(out.indices) == len(out.extra_lines)
        assert set(out.indices) <= set(m.indices)
        assert out.manifest["in_sketch"]["variant"] == "add" and out.manifest["n_extra_samples"] == len(out.extra_lines)
    paths, caps = read_tsv(out.to_tsv(tmp_path / out.filename()))
    assert len(paths) == len(out) and paths[0] == out.extra_lines[0].split("\t")[0]
    from torchvision.transforms.functional import to_tensor
    view = out.torch_dataset(to_tensor)  # what the trainer iterates: IN-Sketch images first, label -1
    img, cap, k, d = view[0]
    assert "axolotl" in cap
    assert len(view) == len(out) and (k, d) == (-1, -1) and cap == caps[0] and img.shape == (3, 4, 4)
    with pytest.raises(ValueError, match="applies to setups"):
        add_imagenet_sketch(build_mixture(dn, "cg_low", test_domain="sketch", test_classes=["axe"]), in_root)


def test_mix_variants_are_nested_and_keep_the_cg_high_size(dn, in_root):
    """paper.md §4 mix: drop (IN lines added - DN sketches removed) non-sketch samples, so every mix
    mixture has exactly CG-high's size."""
    m = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=["axe"])
    s = dn.domain_index("sketch")
    n = int(m.counts()[s].sum()) + 20  # more lines than any variant removes DN sketches
    info = {"n_lines": n}
    lines = [f"/in-sketch/{i}.JPEG\ta sketch of a thing." for i in range(n)]
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
        removed = before[s].sum() - after[s].sum()
        assert 0 < removed < len(lines)
        assert before[others].sum() - after[others].sum() == len(lines) - removed
        assert len(out) == len(m) and out.manifest["in_sketch"]["size_change"] == 0
        assert out.id.endswith(f"-with-in-sketches-{keep}")
    assert kept["one"] <= kept["onep"] <= kept["fivep"] <= kept["tenp"] <= kept["twentyfivep"] <= kept["thirtyp"] <= kept["fiftyp"]
    few = with_in_sketches(m, lines[:3], info, keep="one")  # fewer lines than removed sketches: nothing dropped
    assert few.counts()[others].sum() == before[others].sum()
    assert few.manifest["in_sketch"]["size_change"] == len(few) - len(m) < 0
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
    assert "+ 3 ImageNet-Sketch lines" in capsys.readouterr().out
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
