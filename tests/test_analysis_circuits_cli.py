"""`clipmech analyze circuits|patching`: argument wiring and user errors (the full run is exercised
on a trained tiny model outside the test suite; see the issue report)."""
import argparse

import pytest
import torch

from clipmech.analysis import cli_causal
from clipmech.models import HookedCLIP
from clipmech.train.config import load_config, save_config


def _parser():
    parser = argparse.ArgumentParser()
    analyze = parser.add_subparsers().add_parser("analyze").add_subparsers()
    cli_causal.register(analyze)
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_config(load_config({"model": {"name": "tiny-rn", "image_size": 32}}), run / "config.toml")
    model = HookedCLIP.from_config({**HookedCLIP.from_config("tiny-rn").cfg})
    torch.save({"epoch": 0, "name": "tiny-rn", "state_dict": model.state_dict(), "model_cfg": model.cfg},
               run / "epoch_0.pt")
    return run


@pytest.mark.parametrize("command", ["patching"])
def test_parses_and_rejects_unknown_domain(run_dir, command):
    args = _parser().parse_args(["analyze", command, str(run_dir), "--domains", "sketchh"])
    assert args.func in (cli_causal.run_circuits, cli_causal.run_patching)
    with pytest.raises(KeyError, match="'sketch'"):
        args.func(args)


def test_missing_epoch_and_run_dir_errors(run_dir, tmp_path):
    args = _parser().parse_args(["analyze", "circuits", str(run_dir), "--checkpoint", "7"])
    with pytest.raises(FileNotFoundError, match=r"available epochs: \[0\]"):
        args.func(args)
    args = _parser().parse_args(["analyze", "patching", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="config.toml"):
        args.func(args)
