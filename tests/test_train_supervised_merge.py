"""The supervised baseline as the paper ran it (paper.md §6): base TSV (ImageNet layout) + DomainNet
samples, labels merged through the mapping into a 1000 + C-way head, evaluated on the last C logits."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipmech.data import DomainNet, build_mixture
from clipmech.data.imagenet_mapping import PAPER_ASSETS, imagenet_class_of_path, merged_labels
from clipmech.data.synthetic import fake_counts, write_fake_domainnet
from clipmech.train.supervised import SupervisedClassifier, supervised_labels

CLASSES = ("axe", "banana", "bear", "zebra", "lion")
BASE = {596: 2, 954: 1, 0: 2, 294: 1, 295: 1}  # axe, banana, tench (maps to fish), two bears


def test_1345_way_merge_follows_the_mapping():
    """Re-derived from the mapping file for the 345 DomainNet classes (paper.md §3.2, §6)."""
    mapping = json.loads((PAPER_ASSETS / "in_to_dn_mapping.json").read_text())
    dn = sorted(mapping)  # the 345 DomainNet names; label j = alphabetical index
    imagenet, domainnet = merged_labels(dn)
    assert len(dn) == 345 and domainnet == [1000 + j for j in range(345)]
    for j, name in enumerate(dn):
        for k in mapping[name] or []:
            assert imagenet[k] == 1000 + j
    mapped = {k for ks in mapping.values() if ks for k in ks}
    assert [k for k in range(1000) if imagenet[k] == k] == sorted(set(range(1000)) - mapped)
    assert len(set(imagenet) | set(domainnet)) == 550 + 345  # 1345 logits, 895 of them used
    assert imagenet[403] == 1000 + dn.index("aircraft carrier") and imagenet[0] == 1000 + dn.index("fish")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sup")
    dn = DomainNet(write_fake_domainnet(root / "dn", fake_counts(classes=CLASSES)))
    rows = ["filepath\ttitle"]
    for k in range(1000):
        folder = root / "imagenet" / "train" / f"n{k + 1:08d}"
        folder.mkdir(parents=True)
        for j in range(BASE.get(k, 0)):
            path = folder / f"{k}_{j}.JPEG"
            Image.new("RGB", (12, 12), (k % 256, 40 * j, 90)).save(path)
            rows.append(f"{path}\ta photo {k} {j}")
    (root / "base.tsv").write_text("\n".join(rows) + "\n")
    return root, dn


def test_labels_and_end_to_end_training_and_evaluation(data, tmp_path):
    from clipmech.data.preprocess import eval_images
    from clipmech.eval.zeroshot import evaluate_run
    from clipmech.train.trainer import train

    root, dn = data
    m = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=["axe"], base=root / "base.tsv")
    labels, n_classes = supervised_labels(m)
    assert n_classes == 1000 + len(CLASSES) and len(labels) == len(m)
    base_classes = [imagenet_class_of_path(line.split("\t")[0]) for line in m.base_lines]
    assert base_classes == [0, 0, 294, 295, 596, 596, 954]
    c = {name: 1000 + dn.classes.index(name) for name in CLASSES}
    assert labels[:7].tolist() == [0, 0, c["bear"], c["bear"], c["axe"], c["axe"], c["banana"]]
    assert labels[7:].tolist() == (1000 + dn.class_idx[m.indices]).tolist()
    out = train({"model": {"name": "tiny-rn", "image_size": 32}, "optim": {"name": "sgd", "lr": 0.05},
                 "schedule": {"kind": "step", "warmup": 0},
                 "train": {"objective": "supervised", "epochs": 1, "batch_size": 32, "out": str(tmp_path / "run"),
                           "progress": False, "tensorboard": False, "device": "cpu"}}, mixture=m)
    model = SupervisedClassifier.from_checkpoint(out / "epoch_1.pt")
    assert model.num_classes == 1005
    results = json.loads(evaluate_run(out, dataset=dn).read_text())
    idx = dn.indices(split="test")
    with torch.no_grad():
        pred = model(eval_images(dn, idx, 32))[:, -len(CLASSES):].argmax(1).numpy()  # the last C logits
    rows = (dn.domain_idx[idx] == dn.domain_index("real")) & (dn.class_idx[idx] != dn.class_index("axe"))
    assert results["1"]["real/C1/top1"] == pytest.approx((pred[rows] == dn.class_idx[idx][rows]).mean())
    assert np.isfinite(list(results["1"].values())).all()


def test_path_outside_the_imagenet_layout(tmp_path):
    (tmp_path / "x" / "photos").mkdir(parents=True)
    with pytest.raises(ValueError, match="WordNet-id class folders"):
        imagenet_class_of_path(tmp_path / "x" / "photos" / "a.jpg")
