"""Zero-shot evaluation: metric known answers, parity with open_clip's zero-shot classifier, results.json
layout, feature cache (reuse and invalidation), templates, CLI."""
import json

import numpy as np
import open_clip
import pytest
import torch
from test_train_synthetic import synthetic_dataset, synthetic_mixture

from clipmech.eval.templates import DOMAINNET_TEMPLATES, EMOJI_TEMPLATES, get_templates
from clipmech.data.preprocess import eval_images
from clipmech.eval.zeroshot import classification_metrics, evaluate_run, zero_shot
from clipmech.models.hooked_clip import HookedCLIP
from clipmech.train import train
from clipmech.utils import file_hash


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = {"model": {"name": "tiny-rn", "image_size": 32}, "schedule": {"warmup": 1},
           "train": {"epochs": 1, "batch_size": 18, "out": str(out), "progress": False, "tensorboard": False,
                     "device": "cpu"}}
    return train(cfg, mixture=synthetic_mixture())


def test_classification_metrics_known_answer():
    classes = ["a", "b", "c"]
    labels = torch.tensor([0, 0, 0, 1, 2])
    scores = torch.tensor([[3., 2, 1], [3, 2, 1], [2, 3, 1], [1, 3, 2], [3, 2, 1]])  # preds 0 0 1 1 0
    m = classification_metrics(scores, labels, classes, k=2)
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["top1_balanced"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["top2"] == pytest.approx(4 / 5)  # image 3 has its class second; the class-c image third
    assert m["per_class"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.0})
    assert sorted(map(tuple, m["confusion"])) == [(0, 0, 2), (0, 1, 1), (1, 1, 1), (2, 0, 1)]


def test_zero_shot_matches_open_clip_zero_shot_classifier(run_dir):
    ds = synthetic_dataset()
    model = HookedCLIP.from_checkpoint(run_dir / "epoch_1.pt")
    templates = ["a photo of a {}.", "a sketch of the {}."]
    idx = ds.indices(split="test")
    res = zero_shot(model, ds, idx, templates=templates)
    clip = model.to_open_clip().eval()
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=model.cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(clip, tok, ds.classes, templates, device="cpu")  # [D, K]
        feats = clip.encode_image(eval_images(ds, idx, 32), normalize=True)
    pred = (feats @ head).argmax(1).numpy()
    labels, dom = ds.class_idx[idx], ds.domain_idx[idx]
    c2 = np.isin(labels, [ds.class_index(c) for c in ds.default_test_classes])
    for d, name in enumerate(ds.domains):
        for group, mask in (("C1", ~c2), ("C2", c2)):
            rows = (dom == d) & mask
            assert res["metrics"][f"{name}/{group}/top1"] == pytest.approx((pred[rows] == labels[rows]).mean())


def test_evaluate_run_writes_every_epoch_and_caches(run_dir, monkeypatch):
    ds = synthetic_dataset()
    first = json.loads(evaluate_run(run_dir, dataset=ds).read_text())
    assert sorted(first) == ["0", "1"]
    keys = {f"{d}/{g}/{m}" for d in ds.domains for g in ("C1", "C2") for m in ("top1", "top1_balanced", "top5")}
    assert set(first["1"]) == keys
    assert all(0.0 <= v <= 1.0 for v in first["1"].values())
    details = json.loads((run_dir / "eval" / "details.json").read_text())
    assert set(details["1"]["sketch/C2"]["per_class"]) == {"blue square", "magenta dot"}

    loads = {"n": 0}
    real = HookedCLIP.from_checkpoint.__func__

    def counting(cls, *a, **k):
        loads["n"] += 1
        return real(cls, *a, **k)

    monkeypatch.setattr(HookedCLIP, "from_checkpoint", classmethod(counting))
    assert json.loads(evaluate_run(run_dir, dataset=ds).read_text()) == first
    assert loads["n"] == 0  # everything served from the cache, no checkpoint loaded

    cache_files = set((run_dir / "eval" / "cache").glob("*.pt"))
    assert len(cache_files) == 4  # image features + class head per checkpoint
    ckpt = torch.load(run_dir / "epoch_1.pt", weights_only=True)
    ckpt["state_dict"]["visual.attnpool.c_proj.weight"].mul_(-1.0)  # a different model under the same name
    torch.save(ckpt, run_dir / "epoch_1.pt")
    changed = json.loads(evaluate_run(run_dir, dataset=ds).read_text())
    assert loads["n"] == 1  # only the changed checkpoint is recomputed
    assert len(set((run_dir / "eval" / "cache").glob("*.pt")) - cache_files) == 2
    fresh = zero_shot(real(HookedCLIP, run_dir / "epoch_1.pt"), ds, templates=get_templates("auto", ds.name))
    assert changed["1"] == fresh["metrics"] and changed["0"] == first["0"]


def test_fp16_evaluation_matches_fp32_and_is_recorded(run_dir, tmp_path):
    """The paper's fp16 model: same predictions as fp32 except where fp32's top-2 margin is within the
    fp16 score error (|fp16 - fp32| <= 2e-2 on unit-norm cosines), and meta.json says which ran."""
    from clipmech.eval.zeroshot import clip_scores
    ds = synthetic_dataset()
    full = json.loads(evaluate_run(run_dir, dataset=ds, cache_dir=tmp_path / "c32").read_text())
    assert json.loads((run_dir / "eval" / "meta.json").read_text())["precision"] == "fp32"
    half = json.loads(evaluate_run(run_dir, dataset=ds, cache_dir=tmp_path / "c16", precision="fp16").read_text())
    meta = json.loads((run_dir / "eval" / "meta.json").read_text())
    assert meta["precision"] == "fp16" and meta["n_test_images"] == len(ds.indices(split="test"))
    feats = {}
    for name in ("c32", "c16"):  # the cached image features of epoch 1: fp16 really ran, and is close
        for key_file in (tmp_path / name).glob("*.json"):
            key = json.loads(key_file.read_text())
            if key["kind"] == "image_features" and key["checkpoint"] == file_hash(run_dir / "epoch_1.pt"):
                feats[name] = (key.get("precision"), torch.load(key_file.with_suffix(".pt")))
    assert feats["c32"][0] is None and feats["c16"][0] == "fp16"
    assert not torch.equal(feats["c16"][1], feats["c32"][1]) and torch.allclose(feats["c16"][1], feats["c32"][1],
                                                                                 atol=1e-2)
    idx, templates = ds.indices(split="test"), get_templates("auto", ds.name)
    names = [c.replace("_", " ") for c in ds.classes]
    s32 = clip_scores(lambda: HookedCLIP.from_checkpoint(run_dir / "epoch_1.pt").eval(), ds, idx, names, templates, 32)
    s16 = clip_scores(lambda: HookedCLIP.from_checkpoint(run_dir / "epoch_1.pt").half().eval(), ds, idx, names,
                      templates, 32)
    assert torch.allclose(s16, s32, atol=2e-2)
    top2 = s32.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1] <= 4e-2).numpy()
    flipped = (s16.argmax(1) != s32.argmax(1)).numpy()
    assert not (flipped & ~near_tie).any()
    labels, dom = ds.class_idx[idx], ds.domain_idx[idx]
    for key, value in full["1"].items():
        if key.endswith("/top1"):
            d, group = key.split("/")[:2]
            rows = (dom == ds.domain_index(d)) & (np.isin(labels, [ds.class_index(c) for c in ds.default_test_classes])
                                                  == (group == "C2"))
            assert abs(half["1"][key] - value) <= near_tie[rows].sum() / rows.sum() + 1e-9, key
    with pytest.raises(KeyError, match="fp16"):
        evaluate_run(run_dir, dataset=ds, precision="half")
    # without an argument the run config's [eval] precision decides (what `clipmech train` / `experiment run` use)
    cfg_text = (run_dir / "config.toml").read_text()
    try:
        assert cfg_text.count('precision = "fp32"') == 1  # [eval]'s ([train] precision is "auto")
        (run_dir / "config.toml").write_text(cfg_text.replace('precision = "fp32"', 'precision = "fp16"'))
        assert json.loads(evaluate_run(run_dir, dataset=ds, cache_dir=tmp_path / "c16").read_text()) == half
        assert json.loads((run_dir / "eval" / "meta.json").read_text())["precision"] == "fp16"
    finally:
        (run_dir / "config.toml").write_text(cfg_text)


def test_eval_cli_prints_and_errors(run_dir, capsys, tmp_path, monkeypatch):
    import clipmech.data
    from clipmech.cli import main
    ds = synthetic_dataset()  # the run's config names 'emoji'; the CLI must load ours
    monkeypatch.setattr(clipmech.data, "load_dataset", lambda name, **kw: ds, raising=False)
    assert main(["eval", str(run_dir), "--templates", "simple"]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoints (fp32)" in out and "sketch/C2/top1" in out
    assert main(["eval", str(run_dir), "--templates", "simple", "--fp16"]) == 0
    assert "2 checkpoints (fp16)" in capsys.readouterr().out
    assert json.loads((run_dir / "eval" / "meta.json").read_text())["precision"] == "fp16"
    assert main(["eval", str(tmp_path / "missing")]) == 1
    assert "config.toml not found" in capsys.readouterr().err


def test_templates():
    assert len(DOMAINNET_TEMPLATES) == 86 and len(set(DOMAINNET_TEMPLATES)) == 86
    assert DOMAINNET_TEMPLATES[:80] == [t("{}") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert "a quickdraw of the {}." in DOMAINNET_TEMPLATES
    assert get_templates("auto", "emoji") == EMOJI_TEMPLATES
    assert get_templates("auto", "domainnet") == DOMAINNET_TEMPLATES
    with pytest.raises(KeyError, match="'emoji'"):
        get_templates("emojj")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["a photo"])


def test_template_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a {} here.\n\nthe {}\n")
    assert get_templates(str(path)) == ["a {} here.", "the {}"]


def test_supervised_run_is_evaluated_with_its_class_head(tmp_path):
    from clipmech.train.supervised import SupervisedClassifier
    ds = synthetic_dataset()
    out = train({"model": {"name": "tiny-rn", "image_size": 32}, "optim": {"name": "sgd", "lr": 0.05},
                 "schedule": {"kind": "step", "warmup": 0},
                 "train": {"objective": "supervised", "epochs": 1, "batch_size": 27, "out": str(tmp_path / "sup"),
                           "progress": False, "tensorboard": False, "device": "cpu"}}, mixture=synthetic_mixture(ds))
    results = json.loads(evaluate_run(out, dataset=ds).read_text())
    idx = ds.indices(split="test")
    with torch.no_grad():
        pred = SupervisedClassifier.from_checkpoint(out / "epoch_1.pt")(eval_images(ds, idx, 32)).argmax(1).numpy()
    rows = (ds.domain_idx[idx] == ds.domain_index("real")) & ~np.isin(ds.class_idx[idx], [2, 5])  # C1 of real
    assert results["1"]["real/C1/top1"] == pytest.approx((pred[rows] == ds.class_idx[idx][rows]).mean())
