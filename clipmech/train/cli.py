"""`clipmech train`: train a CLIP (or the supervised baseline) from a TOML config plus overrides."""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

# flag -> (config section, key)
OVERRIDES = {
    "dataset": ("data", "dataset"),
    "setup": ("mixture", "setup"),
    "test_domain": ("mixture", "test_domain"),
    "model": ("model", "name"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("optim", "lr"),
    "seed": ("train", "seed"),
    "out": ("train", "out"),
    "verify": ("data", "verify"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a CLIP on a mixture (CPU, GPU or torchrun DDP)",
                              description=__doc__)
    p.add_argument("--config", metavar="FILE", help="TOML config (sections model, data, mixture, optim, "
                   "schedule, train, eval); flags below override it")
    p.add_argument("--dataset", metavar="NAME_OR_ROOT", help="'emoji' or a DomainNet root folder")
    p.add_argument("--setup", metavar="SETUP", help="mixture setup, e.g. cg_low, cg_high, lod, natural_only")
    p.add_argument("--test-domain", metavar="DOMAIN", help="held-out test domain d*")
    p.add_argument("--model", metavar="NAME", help="open_clip config name or preset (tiny-rn, tiny-vit)")
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, metavar="N", help="per process and micro-batch")
    p.add_argument("--lr", type=float, metavar="LR")
    p.add_argument("--seed", type=int, metavar="N")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory")
    p.add_argument("--verify", choices=("none", "header", "decode"), help="check DomainNet image files when "
                   "loading: header (PIL identifies them) or decode (every pixel; catches truncated files); "
                   "default: [data] verify or none. Unreadable files met later are skipped and counted")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest.pt "
                   "(uses RUN_DIR/config.toml when --config is not given)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Nested config overrides for the flags that were given."""
    out: dict = {}
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from clipmech.locks import unit_lock
    from clipmech.train.config import RESUMABLE_CHANGES, ConfigError, config_difference, load_config
    from clipmech.train.trainer import train

    config = args.config
    saved = Path(args.out) / "config.toml" if args.out is not None else None
    if config is None and args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out RUN_DIR (or a --config naming it)")
        config = saved if saved.is_file() else None
    cfg = load_config(config, overrides_from_args(args))  # checked before anything is written
    if cfg["train"]["out"] is None:
        raise ValueError("no run directory: set [train] out in the config or pass --out RUN_DIR")
    saved = Path(cfg["train"]["out"]) / "config.toml"
    if args.resume and saved.is_file():
        changed = config_difference(load_config(saved), cfg, RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"cannot resume {saved.parent} with another configuration ({'; '.join(changed)}); "
                              "resume without --config to use the run's own, or choose another --out")
    lock = unit_lock(cfg["train"]["out"], "train") if int(os.environ.get("RANK", "0")) == 0 else None
    with lock or contextlib.nullcontext():
        run_dir = train(cfg, resume=args.resume)
        print(f"clipmech train: finished; run directory {run_dir}")
        # Under torchrun every process gets here; one evaluates, still holding the run's lock. The
        # evaluation comes from the CLI layer (clipmech.cli sets `after_train`): train/ does not import eval/.
        after = getattr(args, "after_train", None)
        if cfg["eval"]["after_train"] and lock is not None and after is not None:
            after(run_dir)
    return 0
