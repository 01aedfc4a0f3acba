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

from clipmech.checks import check_typed, has_type
from clipmech.errors import ConfigError
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
        "verify": "none",           # image files checked when loading: none | header | decode (full decode)
        "max_unreadable": 0.01,     # share of unreadable images met in training / evaluation that fails the run
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
        "objective": "clip",        # clip | supervised (image tower + linear head, docs/methods.md#training)
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
        "precision": "fp32",        # fp32 | fp16 (the paper's half-precision evaluation model)
        "after_train": False,       # `clipmech train` evaluates every checkpoint when training ends (train() does not)
    },
    # paper fidelity (experiments/README.md, parity table)
    "analysis": {
        "paper_compat": False,      # true: reproduce the paper code's documented quirks (allow-p float ceil, CKA painting class list, ...)
    },
}



# Typed schema: (section, key) -> (type, rule). Types: "bool", "int", "float" (ints accepted), "str",
# "list[str]", "list[int]"; a trailing "?" allows None (unset). Rules: ">0", ">=0", ">=1", "0..1",
# "0..1)" (upper bound excluded) or a tuple of choices. Keys missing here are checked against the
# type of their default, so a key added to DEFAULTS is never left unchecked.
SCHEMA: dict[tuple[str, str], tuple[str, Any]] = {
    ("model", "name"): ("str", None),
    ("model", "image_size"): ("int?", ">=1"),
    ("model", "grad_checkpointing"): ("bool", None),
    ("data", "dataset"): ("str", None),
    ("data", "workers"): ("int", ">=0"),
    ("data", "base"): ("str?", None),
    ("data", "verify"): ("str", ("none", "header", "decode")),
    ("data", "max_unreadable"): ("float", "0..1"),
    ("mixture", "setup"): ("str", None),
    ("mixture", "test_domain"): ("str?", None),
    ("mixture", "test_classes"): ("list[str]?", None),
    ("mixture", "allow_p"): ("float?", "0..1"),
    ("mixture", "domains"): ("str?", None),
    ("mixture", "aligned"): ("bool", None),
    ("mixture", "seed"): ("int", ">=0"),
    ("mixture", "in_sketch"): ("str?", None),
    ("mixture", "in_sketch_keep"): ("str?", None),
    ("mixture", "in_sketch_filter"): ("str", ("mapping", "dn_substring", "dn_words")),
    ("optim", "name"): ("str", ("adamw", "sgd")),
    ("optim", "lr"): ("float", ">0"),
    ("optim", "weight_decay"): ("float", ">=0"),
    ("optim", "beta1"): ("float", "0..1)"),
    ("optim", "beta2"): ("float", "0..1)"),
    ("optim", "eps"): ("float", ">0"),
    ("optim", "momentum"): ("float", "0..1)"),
    ("schedule", "kind"): ("str", ("cosine", "const", "step")),
    ("schedule", "warmup"): ("int", ">=0"),
    ("schedule", "milestones"): ("list[int]", None),
    ("schedule", "gamma"): ("float", ">0"),
    ("train", "objective"): ("str", ("clip", "supervised")),
    ("train", "epochs"): ("int", ">=1"),
    ("train", "batch_size"): ("int", ">=1"),
    ("train", "accum_freq"): ("int", ">=1"),
    ("train", "seed"): ("int", ">=0"),
    ("train", "precision"): ("str", ("auto", "fp32", "amp_bf16", "amp_fp16")),
    ("train", "device"): ("str", ("auto", "cpu", "cuda")),
    ("train", "out"): ("str?", None),
    ("train", "save_every"): ("int", ">=1"),
    ("train", "save_epochs"): ("list[int]?", None),
    ("train", "tensorboard"): ("bool", None),
    ("train", "progress"): ("bool", None),
    ("eval", "templates"): ("str", None),
    ("eval", "batch_size"): ("int", ">=1"),
    ("eval", "precision"): ("str", ("fp32", "fp16")),
    ("eval", "after_train"): ("bool", None),
    ("analysis", "paper_compat"): ("bool", None),
}

def _inferred(default: Any) -> tuple[str, Any]:
    """The schema entry of a key that has none: the type of its default (unchecked when None)."""
    for kind in ("bool", "int", "float", "str"):
        if has_type(default, kind):
            return kind, None
    return "any", None


def check_value(section: str, key: str, value: Any) -> None:
    """Raise ConfigError unless `value` has the schema type and range of [section] key."""
    kind, rule = SCHEMA.get((section, key)) or _inferred(DEFAULTS[section][key])
    check_typed(f"[{section}] {key}", value, kind, rule)


def _unknown_key(kind: str, key: str, valid: list[str]) -> ValueError:
    near = ", ".join(repr(v) for v in closest_names(key, valid))
    return ConfigError(f"unknown config {kind} {key!r}; closest valid: {near} (all valid: {', '.join(valid)})")


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base`, rejecting sections/keys that `base` lacks."""
    out = copy.deepcopy(base)
    for section, values in update.items():
        if section not in out:
            raise _unknown_key("section", section, list(out))
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{section}] must be a table, got {type(values).__name__}")
        for key, value in values.items():
            if key not in out[section]:
                raise _unknown_key(f"key in [{section}]", key, list(out[section]))
            out[section][key] = value
    return out


def validate(cfg: dict) -> dict:
    """Check every value's type and range (SCHEMA) and the cross-key rules; returns `cfg`.

    Raises ConfigError naming the key, the value and what it must be. Cost: microseconds.
    """
    for section, values in cfg.items():
        for key, value in values.items():
            check_value(section, key, value)
    t = cfg["train"]
    keep = t["save_epochs"]
    if keep is not None and not all(0 <= e <= t["epochs"] for e in keep):
        raise ConfigError(f"[train] save_epochs must be a list of epochs in 0..{t['epochs']}, got {keep!r}")
    return cfg


def load_config(source: dict | str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- `source` (dict or TOML path) <- `overrides`; validated nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if source is not None:
        if not isinstance(source, dict):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            try:
                with open(path, "rb") as fh:
                    source = tomllib.load(fh)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
            source.pop("meta", None)  # provenance written by save_config, not a setting
        cfg = merge(cfg, source)
    if overrides:
        cfg = merge(cfg, overrides)
    return validate(cfg)


# Keys a resumed run may change: they do not alter what the finished run computes (longer training,
# saving, display, hardware; batch-size changes are announced by the trainer).
RESUMABLE_CHANGES = {("train", k) for k in ("epochs", "save_every", "save_epochs", "tensorboard", "progress",
                                            "device", "precision", "batch_size", "accum_freq", "out")} | \
    {("data", k) for k in ("workers", "verify", "max_unreadable")} | {("eval", k) for k in DEFAULTS["eval"]}


def config_difference(old: dict, new: dict, ignore: set[tuple[str, str]] = frozenset()) -> list[str]:
    """'[section] key old -> new' for every key whose value differs (sections/keys of `new`)."""
    out = []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key)
            if (section, key) not in ignore and before != value:
                out.append(f"[{section}] {key} {before!r} -> {value!r}")
    return out


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
