"""Subprocess trainer tests: SIGKILL mid-epoch + resume is bit-exact; 2-process gloo DDP equals one process."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipmech.train.config import load_config, save_config

TESTS = Path(__file__).parent

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_train_synthetic import synthetic_mixture
from clipmech.train import train
train(sys.argv[1], mixture=synthetic_mixture(), resume="--resume" in sys.argv)
"""


def _setup(tmp_path: Path, name: str, model: str = "tiny-rn", optim: dict | None = None,
           **train_overrides) -> tuple[Path, Path, Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    out = tmp_path / name
    t = {"epochs": 2, "batch_size": 6, "save_every": 3, "progress": False, "tensorboard": False,
         "device": "cpu", "out": str(out), **train_overrides}
    cfg = load_config({"model": {"name": model, "image_size": 32}, "train": t, "schedule": {"warmup": 2},
                       "optim": optim or {"lr": 2e-3}})
    config = save_config(cfg, tmp_path / f"{name}.toml")
    return driver, config, out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}


def _log(out: Path) -> list[tuple]:
    return [(r["epoch"], r["step"], r["loss"], r["lr"]) for r in csv.DictReader(open(out / "log.csv"))]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    driver, config_a, ref = _setup(tmp_path, "ref")
    subprocess.run([sys.executable, str(driver), str(config_a)], check=True, env=_env(), timeout=300)

    _, config_b, out = _setup(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, str(driver), str(config_b)], env=_env())
    deadline = time.time() + 240
    while not (out / "latest.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "done").exists(), "the run finished before it could be killed"
    killed_at = torch.load(out / "latest.pt", weights_only=False)["step"]
    assert 0 < killed_at < 18

    subprocess.run([sys.executable, str(driver), str(config_b), "--resume"], check=True, env=_env(), timeout=300)
    assert (out / "done").exists()
    for epoch in (0, 1, 2):
        a = torch.load(ref / f"epoch_{epoch}.pt", weights_only=True)["state_dict"]
        b = torch.load(out / f"epoch_{epoch}.pt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"epoch {epoch} differs after resume"
    assert _log(out) == _log(ref)  # the log was truncated to the resume point and continued identically


def test_two_process_gloo_ddp_matches_one_process_with_the_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # tiny-vit: no BatchNorm, so per-rank batches change nothing. SGD: Adam would blow the float
    # noise of exactly-zero gradients (attention key biases) up to full-size steps.
    setting = dict(model="tiny-vit", optim={"name": "sgd", "lr": 0.05}, epochs=1)
    driver, config_ddp, ddp = _setup(tmp_path, "ddp", batch_size=6, **setting)
    _, config_one, one = _setup(tmp_path, "one", batch_size=12, **setting)
    res = subprocess.run(torchrun + [str(driver), str(config_ddp)], env=_env(), timeout=300,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    subprocess.run([sys.executable, str(driver), str(config_one)], check=True, env=_env(), timeout=300)
    a = torch.load(ddp / "epoch_1.pt", weights_only=True)["state_dict"]
    b = torch.load(one / "epoch_1.pt", weights_only=True)["state_dict"]
    start = torch.load(one / "epoch_0.pt", weights_only=True)["state_dict"]
    assert not torch.equal(a["text_projection"], start["text_projection"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), k
    losses_ddp = [float(r[2]) for r in _log(ddp)]
    losses_one = [float(r[2]) for r in _log(one)]
    assert losses_ddp == pytest.approx(losses_one, rel=1e-4)
    assert losses_ddp[-1] < losses_ddp[0]
