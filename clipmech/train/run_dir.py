"""A training run directory, read in one place.

`clipmech train` writes RUN_DIR/config.toml (the resolved config), epoch_0.pt (the untrained model)
.. epoch_N.pt and, after evaluation, RUN_DIR/eval/. Everything that reads a run (evaluation, the
analyses, the study) asks this module whether a folder is a run, for its config and for its
checkpoints, so the checks and their messages exist once.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clipmech.utils import PathLike

CONFIG = "config.toml"


def is_run_dir(path: PathLike) -> bool:
    """Whether `path` holds a clipmech run's config.toml."""
    return (Path(path) / CONFIG).is_file()


def require_run_dir(path: PathLike) -> Path:
    """`path` as a Path; FileNotFoundError naming the missing config.toml when it is not a run."""
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path / CONFIG} not found; is {path} a clipmech run directory?")
    return path


def run_config(path: PathLike) -> dict[str, Any]:
    """The run's resolved config (clipmech.train.config.load_config of RUN_DIR/config.toml)."""
    from clipmech.train.config import load_config
    return load_config(require_run_dir(path) / CONFIG)


def checkpoints(path: PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch_N.pt in the run, by epoch (empty when there are none)."""
    found = []
    for p in Path(path).glob("epoch_*.pt"):
        m = re.fullmatch(r"epoch_(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint(path: PathLike, epoch: int | None = None) -> tuple[int, Path]:
    """(epoch, file) of the run's checkpoint `epoch` (None: the last one saved); FileNotFoundError
    naming the available epochs otherwise."""
    found = dict(checkpoints(path))
    if not found:
        raise FileNotFoundError(f"no epoch_N.pt checkpoints in {path}; train first (clipmech train)")
    epoch = max(found) if epoch is None else epoch
    if epoch not in found:
        raise FileNotFoundError(f"{path}/epoch_{epoch}.pt not found; available epochs: {sorted(found)}")
    return epoch, found[epoch]


def final_checkpoint(path: PathLike, cfg: dict[str, Any]) -> Path:
    """The checkpoint of the run's last configured epoch; FileNotFoundError while training is unfinished."""
    file = Path(path) / f"epoch_{cfg['train']['epochs']}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the run has not finished training")
    return file
