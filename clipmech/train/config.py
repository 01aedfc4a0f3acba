"""Run configuration: TOML sections model/data/mixture/optim/schedule/train/eval/analysis, defaults, validation.

A config is a plain nested dict. `load_config` fills defaults and rejects unknown sections or keys
(naming the closest valid ones), so a typo never silently falls back to a default. The resolved
config is written into the run directory (`config.toml`, with tomli-w) with the package version
and git hash.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from clipmech.utils import atomic_write_text, closest_names

# None means "not set": the key is omitted from the written TOML and the consumer picks its own default.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "tiny-rn",          # open_clip config name or clipmech preset
        "image_size": None,         # overrides vision_cfg.image_size (e.g. 32 for fast CPU runs)
        "grad_checkpointing": False,
    },
    "data": {
        "dataset": "emoji",         # registered dataset name or a DomainNet root folder
        "workers": 0,               # DataLoader workers (use >0 for image files on disk)
        "base": None,               # base image-text TSV (filepath<TAB>title, e.g. ImageNet-Captions)
    },
    "mixture": {
        "setup": "cg_high",
        "test_domain": None,        # dataset default when unset
        "test_classes": None,       # dataset default C2 when unset
        "allow_p": None,
        "domains": None,
        "aligned": False,
        "seed": 42,
        "in_sketch": None,          # ImageNet-Sketch root: the paper's sketch add / mix variants
        "in_sketch_keep": None,     # mix variant: fiftyp | thirtyp | twentyfivep | tenp | fivep | onep | one
        "in_sketch_filter": "mapping",  # mapping (paper) | dn_substring | dn_words (clipmech.data.imagenet_sketch)
    },
    "optim": {
        "name": "adamw",            # adamw | sgd (Nesterov; the supervised baseline's recipe)
        "lr": 1e-3,
        "weight_decay": 0.2,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "momentum": 0.9,            # sgd only
    },
    "schedule": {
        "kind": "cosine",           # cosine | const | step
        "warmup": 500,              # steps; clamped to 10% of all steps for short runs
        "milestones": [30, 50, 70], # step schedule: epochs where lr is multiplied by gamma
        "gamma": 0.1,
    },
    "train": {
        "objective": "clip",        # clip | supervised (image tower + linear head, paper.md §6)
        "epochs": 32,
        "batch_size": 128,          # per process, per micro-batch
        "accum_freq": 1,            # micro-batches per optimizer step; all used as negatives
        "seed": 0,
        "precision": "auto",        # auto | fp32 | amp_bf16 | amp_fp16 (auto: bf16 on GPU, fp32 on CPU)
        "device": "auto",           # auto | cpu | cuda
        "out": None,                # run directory
        "save_every": 50,           # optimizer steps between latest.pt saves
        "save_epochs": None,        # epochs with an epoch_N.pt (list); unset: every epoch. 0 and the last always
        "tensorboard": True,
        "progress": True,
    },
    "eval": {
        "templates": "auto",        # auto | domainnet | emoji | path to a text file (one template per line)
        "batch_size": 256,
        "after_train": False,       # `clipmech train` evaluates every checkpoint when training ends (train() does not)
    },
    # paper fidelity (experiments/README.md, parity table)
    "analysis": {
        "paper_compat": False,      # true: reproduce the paper code's documented quirks (allow-p float ceil, CKA painting class list, ...)
    },
}

_CHOICES = {
    ("schedule", "kind"): ("cosine", "const", "step"),
    ("optim", "name"): ("adamw", "sgd"),
    ("train", "objective"): ("clip", "supervised"),
    ("train", "precision"): ("auto", "fp32", "amp_bf16", "amp_fp16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("mixture", "in_sketch_filter"): ("mapping", "dn_substring", "dn_words"),
    ("analysis", "paper_compat"): (False, True),
}


def _unknown_key(kind: str, key: str, valid: list[str]) -> ValueError:
    near = ", ".join(repr(v) for v in closest_names(key, valid))
    return ValueError(f"unknown config {kind} {key!r}; closest valid: {near} (all valid: {', '.join(valid)})")


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base`, rejecting sections/keys that `base` lacks."""
    out = copy.deepcopy(base)
    for section, values in update.items():
        if section not in out:
            raise _unknown_key("section", section, list(out))
        if not isinstance(values, dict):
            raise ValueError(f"config section [{section}] must be a table, got {type(values).__name__}")
        for key, value in values.items():
            if key not in out[section]:
                raise _unknown_key(f"key in [{section}]", key, list(out[section]))
            out[section][key] = value
    return out


def validate(cfg: dict) -> dict:
    """Check value types/ranges that would otherwise fail late; returns `cfg`."""
    t = cfg["train"]
    for key in ("epochs", "batch_size", "accum_freq", "save_every"):
        if not isinstance(t[key], int) or t[key] < (0 if key == "epochs" else 1):
            raise ValueError(f"[train] {key} must be a positive integer, got {t[key]!r}")
    keep = t["save_epochs"]
    if keep is not None and not (isinstance(keep, list) and all(isinstance(e, int) and 0 <= e <= t["epochs"]
                                                                 for e in keep)):
        raise ValueError(f"[train] save_epochs must be a list of epochs in 0..{t['epochs']}, got {keep!r}")
    if not (isinstance(cfg["optim"]["lr"], (int, float)) and cfg["optim"]["lr"] > 0):
        raise ValueError(f"[optim] lr must be > 0, got {cfg['optim']['lr']!r}")
    for (section, key), choices in _CHOICES.items():
        if cfg[section][key] not in choices:
            raise ValueError(f"[{section}] {key} = {cfg[section][key]!r}; choose one of {', '.join(choices)}")
    return cfg


def load_config(source: dict | str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- `source` (dict or TOML path) <- `overrides`; validated nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if source is not None:
        if not isinstance(source, dict):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            with open(path, "rb") as fh:
                source = tomllib.load(fh)
            source.pop("meta", None)  # provenance written by save_config, not a setting
        cfg = merge(cfg, source)
    if overrides:
        cfg = merge(cfg, overrides)
    return validate(cfg)


def git_hash() -> str | None:
    """Commit of the clipmech source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dumps(cfg: dict) -> str:
    """TOML text for a dict of sections of scalars/lists; None values (unset keys) are omitted."""
    return tomli_w.dumps({section: {k: v for k, v in values.items() if v is not None}
                          for section, values in cfg.items()})


def save_config(cfg: dict, path: str | Path) -> Path:
    """Write `cfg` plus a [meta] section (package version, git hash) atomically as TOML."""
    from clipmech import __version__
    meta = {"version": __version__, "git_hash": git_hash(), "python": sys.version.split()[0]}
    return atomic_write_text(dumps({**cfg, "meta": meta}), path)
