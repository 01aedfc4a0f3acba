"""Run config: defaults, unknown keys, value checks, TOML round trip with provenance, CLI overrides."""
import pytest

from clipmech.cli import build_parser, main
from clipmech.train.cli import overrides_from_args
from clipmech.train.config import DEFAULTS, load_config, save_config


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        load_config({"train": {"batch_sise": 4}})
    msg = str(err.value)
    assert "'batch_sise'" in msg and "'batch_size'" in msg and "accum_freq" in msg
    with pytest.raises(ValueError, match="unknown config section 'optimizer'.*'optim'"):
        load_config({"optimizer": {"lr": 1.0}})


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match=r"\[train\] precision = 'fp64'; choose one of auto, fp32"):
        load_config({"train": {"precision": "fp64"}})
    with pytest.raises(ValueError, match=r"\[train\] batch_size = 0 is out of range; it must be >= 1"):
        load_config({"train": {"batch_size": 0}})
    with pytest.raises(ValueError, match=r"save_epochs must be a list of epochs in 0..2, got \[5\]"):
        load_config({"train": {"epochs": 2, "save_epochs": [5]}})
    with pytest.raises(ValueError, match=r"\[optim\] lr = -1.0 is out of range; it must be > 0"):
        load_config({"optim": {"lr": -1.0}})


def test_toml_round_trip_with_provenance(tmp_path):
    cfg = load_config({"model": {"name": "tiny-vit", "image_size": 32}, "mixture": {"test_classes": ["a b", "c"]},
                       "schedule": {"milestones": [1, 2]}, "train": {"out": str(tmp_path / "run")}})
    path = save_config(cfg, tmp_path / "config.toml")
    text = path.read_text()
    assert "[meta]" in text and 'version = "' in text and "git_hash" in text
    assert load_config(path) == cfg  # [meta] is provenance, not a setting; None values stay defaults
    assert set(cfg) == set(DEFAULTS)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_cli_flags_map_onto_config_sections():
    args = build_parser().parse_args(["train", "--dataset", "emoji", "--setup", "lod", "--test-domain", "sketch",
                                      "--model", "tiny-vit", "--epochs", "3", "--batch-size", "16", "--lr", "0.01",
                                      "--seed", "2", "--out", "r"])
    assert overrides_from_args(args) == {
        "data": {"dataset": "emoji"}, "mixture": {"setup": "lod", "test_domain": "sketch"},
        "model": {"name": "tiny-vit"}, "train": {"epochs": 3, "batch_size": 16, "seed": 2, "out": "r"},
        "optim": {"lr": 0.01}}


def test_cli_reports_user_errors(capsys, tmp_path):
    assert main(["train", "--resume"]) == 1
    assert "--resume needs --out RUN_DIR" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "r")]) == 1
    assert "missing.toml does not exist" in capsys.readouterr().err
    assert main(["train", "--dataset", str(tmp_path / "DomainNet"), "--out", str(tmp_path / "r")]) == 1
    assert "DomainNet does not exist; pass --dataset emoji or a DomainNet folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("after_train,rank,evaluated", [(True, "0", True), (False, "0", False), (True, "1", False)])
def test_train_command_evaluates_after_training_when_asked(tmp_path, monkeypatch, after_train, rank, evaluated):
    """The trainer never evaluates; `clipmech train` does, on one process, when [eval] after_train is set."""
    from clipmech.eval import zeroshot
    from clipmech.train import trainer

    def fake_train(config, overrides=None, resume=False):
        cfg = load_config(config, overrides)
        save_config(cfg, tmp_path / "config.toml")
        return tmp_path

    calls = []
    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(zeroshot, "evaluate_run", lambda run_dir: calls.append(run_dir) or run_dir / "r.json")
    monkeypatch.setenv("RANK", rank)
    config = save_config(load_config({"eval": {"after_train": after_train}}), tmp_path / "in.toml")
    assert main(["train", "--config", str(config), "--out", str(tmp_path)]) == 0
    assert calls == ([tmp_path] if evaluated else [])
