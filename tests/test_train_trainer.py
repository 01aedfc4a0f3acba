"""In-process trainer tests: parameter groups, accumulation = full-batch negatives, a short run's files,
NaN stop, bad input, supervised baseline."""
import contextlib
import csv

import pytest
import torch
from open_clip.loss import ClipLoss
from test_train_synthetic import synthetic_dataset, synthetic_mixture

from clipmech.models.configs import create_open_clip
from clipmech.train import NonFiniteLossError, train
from clipmech.train.trainer import contrastive_step, param_groups

FAST = {"model": {"name": "tiny-rn", "image_size": 32},
        "train": {"epochs": 2, "batch_size": 12, "progress": False, "tensorboard": False, "save_every": 2,
                  "device": "cpu"},
        "schedule": {"warmup": 1}, "optim": {"lr": 2e-3}}


def cfg(out, **sections):
    c = {k: dict(v) for k, v in FAST.items()}
    c["train"]["out"] = str(out)
    for section, values in sections.items():
        c.setdefault(section, {}).update(values)
    return c


def test_param_groups_follow_open_clip_no_decay_rule():
    model = create_open_clip("tiny-rn")
    no_decay, decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert "logit_scale" in nd and "visual.bn1.weight" in nd and "text_projection" not in nd
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    model = create_open_clip("tiny-vit").train()  # LayerNorm only: micro-batching does not change the forward
    images, texts = torch.randn(8, 3, 64, 64), torch.randint(1, 400, (8, 32))
    loss_fn = ClipLoss()

    def grads(micro):
        model.zero_grad()
        loss = contrastive_step(model, loss_fn, micro, contextlib.nullcontext, None)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_loss, full = grads([(images, texts)])
    acc_loss, acc = grads([(images[:4], texts[:4]), (images[4:], texts[4:])])
    assert full_loss == pytest.approx(acc_loss, rel=1e-5)
    assert full.keys() == acc.keys()
    for n in full:
        assert torch.allclose(full[n], acc[n], atol=1e-6, rtol=1e-4), n


def test_short_run_writes_checkpoints_logs_and_done(tmp_path):
    from clipmech.models.hooked_clip import HookedCLIP
    out = train(cfg(tmp_path / "run", train={"tensorboard": True}), mixture=synthetic_mixture())
    names = {p.name for p in out.iterdir()}
    assert {"config.toml", "epoch_0.pt", "epoch_1.pt", "epoch_2.pt", "latest.pt", "log.csv", "tb", "done"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # 54 train images // 12 = 4 steps per epoch
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    e0 = torch.load(out / "epoch_0.pt", weights_only=True)
    e2 = torch.load(out / "epoch_2.pt", weights_only=True)
    assert set(e2) == {"epoch", "name", "state_dict", "model_cfg"} and e2["epoch"] == 2
    assert not torch.equal(e0["state_dict"]["text_projection"], e2["state_dict"]["text_projection"])
    model = HookedCLIP.from_checkpoint(out / "epoch_2.pt")
    assert model.image_size == 32
    assert torch.equal(model.state_dict()["text_projection"], e2["state_dict"]["text_projection"])
    text = (out / "config.toml").read_text()
    assert "[meta]" in text and "git_hash" in text and 'name = "tiny-rn"' in text


def test_save_epochs_keeps_only_the_listed_epochs_plus_first_and_last(tmp_path):
    out = train(cfg(tmp_path / "run", train={"epochs": 3, "save_epochs": [1]}), mixture=synthetic_mixture())
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_0.pt", "epoch_1.pt", "epoch_3.pt"]
    assert torch.load(out / "epoch_3.pt", weights_only=True)["epoch"] == 3


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_forward = ClipLoss.forward

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(ClipLoss, "forward", forward)
    expected = r"loss is nan at epoch 1, step 4 .*Last good checkpoint: .*latest\.pt"
    with pytest.raises(NonFiniteLossError, match=expected):
        train(cfg(tmp_path / "run"), mixture=synthetic_mixture())
    out = tmp_path / "run"
    assert not (out / "done").exists()
    latest = torch.load(out / "latest.pt", weights_only=False)
    assert latest["step"] == 2
    assert all(torch.isfinite(t).all() for t in latest["state_dict"].values() if t.is_floating_point())


def test_batch_larger_than_dataset_fails_before_creating_the_run_dir(tmp_path):
    with pytest.raises(ValueError, match="exceeds the 54 training samples"):
        train(cfg(tmp_path / "run", train={"batch_size": 64}), mixture=synthetic_mixture())
    assert not (tmp_path / "run").exists()


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable.*choose another --out"):
        train(cfg(blocker / "run"), mixture=synthetic_mixture())


def test_existing_run_needs_resume_and_resume_checks_the_model(tmp_path):
    out = tmp_path / "run"
    train(cfg(out, train={"epochs": 1}), mixture=synthetic_mixture())
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(cfg(out, train={"epochs": 1}), mixture=synthetic_mixture())
    with pytest.raises(ValueError, match="cannot resume: .* model 'tiny-rn' .* asks for 'tiny-vit'"):
        train(cfg(out, model={"name": "tiny-vit"}), mixture=synthetic_mixture(), resume=True)
    assert (out / "done").exists()  # the failed resume did not touch the finished run


def test_unknown_model_and_missing_dataset_root(tmp_path):
    with pytest.raises(KeyError, match="tiny-rn"):
        train(cfg(tmp_path / "a", model={"name": "tiny-rnn"}), mixture=synthetic_mixture())
    with pytest.raises(FileNotFoundError, match="dataset root .*nowhere does not exist"):
        train(cfg(tmp_path / "b", data={"dataset": str(tmp_path / "nowhere")}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_supervised_baseline_trains_and_loads(tmp_path):
    from clipmech.train.supervised import SupervisedClassifier
    ds = synthetic_dataset()
    out = train(cfg(tmp_path / "sup", train={"objective": "supervised", "batch_size": 18},
                    optim={"name": "sgd", "lr": 0.05, "weight_decay": 1e-4},
                    schedule={"kind": "step", "milestones": [1], "warmup": 0}), mixture=synthetic_mixture(ds))
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05] * 3 + [0.005] * 3)  # x0.1 after epoch 1
    model = SupervisedClassifier.from_checkpoint(out / "epoch_2.pt")
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, len(ds.classes))
    clip_like = tmp_path / "clip.pt"
    torch.save({"epoch": 1, "state_dict": {}, "model_cfg": {}}, clip_like)
    with pytest.raises(ValueError, match="not a supervised-baseline checkpoint"):
        SupervisedClassifier.from_checkpoint(clip_like)
