"""What `clipmech analyze` runs on: a clipmech training run, or any CLIP someone else trained.

    clipmech analyze cka runs/cg_high-clipart                       # a run: its checkpoint, dataset, C2
    clipmech analyze cka --model RN50 --pretrained openai --dataset /data/domainnet --out runs/rn50
    clipmech analyze cka --hf openai/clip-vit-base-patch32 --dataset emoji --out runs/hf-b32

`add_source_arguments` adds these options to a subcommand; `load_source` turns them into a
`Source`: the model, the dataset, the held-out classes (C2) and test domain, the zero-shot
templates, the output folder and a content key of the weights for activation caches. A run brings
its own C2 classes, test domain and templates; any other model gets the dataset's defaults.
"""
from __future__ import annotations

import argparse
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = "analysis"  # results folder inside a run directory


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR | --model NAME --pretrained TAG_OR_PATH | --hf PATH, plus --checkpoint, --dataset, --out."""
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a clipmech training run directory (or give --model/--pretrained or --hf instead)")
    p.add_argument("--checkpoint", type=int, metavar="EPOCH", help="RUN_DIR's epoch_N.pt to analyse (default: last)")
    p.add_argument("--model", metavar="NAME", help="an open_clip model (RN50, ViT-B-32, ...) or preset (tiny-rn) "
                   "with --pretrained, instead of RUN_DIR")
    p.add_argument("--pretrained", metavar="TAG_OR_PATH", help="weights for --model: an open_clip tag (openai, "
                   "laion2b_s34b_b79k, ...; downloaded once), a local weight file, or hf-hub:ORG/NAME")
    p.add_argument("--hf", metavar="PATH", help="a Hugging Face CLIPModel (folder or hub id; ViT towers) instead of "
                   "RUN_DIR; needs the hf extra")
    p.add_argument("--dataset", metavar="NAME_OR_ROOT", help="'emoji' or a DomainNet root folder "
                   "(default: the run's; required with --model / --hf)")
    p.add_argument("--out", metavar="DIR", help="folder for the results (default: RUN_DIR/analysis; required with "
                   "--model / --hf)")


@dataclass
class Source:
    """A model to analyse and the data around it (see the module docstring)."""
    model: Any  # HookedCLIP, on CPU in eval mode
    model_key: str  # content key of the weights: activation caches are keyed by it
    dataset: Any  # clipmech.data.DomainDataset
    c2: list[str]  # held-out classes: the run's, else the dataset's default
    test_domain: str | None
    templates: Any  # a clipmech.eval.templates.get_templates spec
    out: Path
    epoch: int | None  # the run's checkpoint epoch; None for other models
    meta: dict[str, Any]  # what was analysed, recorded in every result file
    paper_compat: bool = False  # the run config's [analysis] paper_compat (False for other models)

    @property
    def label(self) -> str:
        """Names per-checkpoint result folders: `epoch3` for a run, `pretrained` otherwise."""
        return f"epoch{self.epoch}" if self.epoch is not None else "pretrained"


def load_source(args: argparse.Namespace) -> Source:
    """Resolve add_source_arguments' options; errors name the option to fix. Cost: loading the model
    (a tag or hub id downloads once) and opening the dataset."""
    external = [flag for flag, value in (("--model", args.model), ("--hf", args.hf)) if value]
    if args.run_dir and external or len(external) > 1:
        raise ValueError(f"give one model: RUN_DIR, --model/--pretrained or --hf (got "
                         f"{', '.join((['RUN_DIR'] if args.run_dir else []) + external)})")
    if args.pretrained and not args.model:
        raise ValueError("--pretrained needs --model NAME (e.g. --model RN50 --pretrained openai)")
    if args.run_dir:
        return _from_run(args)
    if not external:
        raise ValueError("nothing to analyse: give RUN_DIR, --model NAME --pretrained TAG_OR_PATH, or --hf PATH")
    return _from_model(args)


def _from_run(args: argparse.Namespace) -> Source:
    from clipmech.data import load_dataset
    from clipmech.eval.zeroshot import checkpoints
    from clipmech.models.hooked_clip import HookedCLIP
    from clipmech.train.config import load_config
    from clipmech.utils import file_hash

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.toml'} not found; is {run_dir} a clipmech run directory?")
    cfg = load_config(run_dir / "config.toml")
    found = dict(checkpoints(run_dir))
    if not found:
        raise FileNotFoundError(f"no epoch_N.pt checkpoints in {run_dir}; train first (clipmech train)")
    epoch = max(found) if args.checkpoint is None else args.checkpoint
    if epoch not in found:
        raise FileNotFoundError(f"{run_dir}/epoch_{epoch}.pt not found; available epochs: {sorted(found)}")
    ds = load_dataset(args.dataset or str(cfg["data"]["dataset"]),
                      verify=getattr(args, "verify", None) or cfg["data"]["verify"])
    return Source(model=HookedCLIP.from_checkpoint(found[epoch]).eval(), model_key=f"file:{file_hash(found[epoch])}",
                  dataset=ds, c2=list(cfg["mixture"]["test_classes"] or ds.default_test_classes or []),
                  test_domain=cfg["mixture"]["test_domain"] or ds.default_test_domain,
                  templates=cfg["eval"]["templates"], out=Path(args.out) if args.out else run_dir / RESULTS,
                  epoch=epoch, meta={"run_dir": str(run_dir), "checkpoint": str(found[epoch]), "epoch": epoch},
                  paper_compat=bool(cfg["analysis"]["paper_compat"]))


def _from_model(args: argparse.Namespace) -> Source:
    from clipmech.data import load_dataset
    from clipmech.models.hooked_clip import HookedCLIP
    from clipmech.models.pretrained import OPENAI_MEAN_STD as OPENAI
    from clipmech.utils import hash_obj

    flag = "--model" if args.model else "--hf"
    if args.checkpoint is not None:
        raise ValueError(f"--checkpoint picks an epoch of a RUN_DIR; it does not apply to {flag}")
    for option, value in (("--dataset", args.dataset), ("--out", args.out)):
        if not value:
            raise ValueError(f"{flag} needs {option} (e.g. --dataset emoji --out runs/my-model)")
    if args.model:
        model = HookedCLIP.from_pretrained(args.model, args.pretrained)
        meta = {"model": args.model, "pretrained": str(args.pretrained)}
        key = {"open_clip": args.model, "weights": _weights_key(args.pretrained)}
    else:
        model = HookedCLIP.from_hf(args.hf)
        meta, key = {"hf": str(args.hf)}, {"hf": _weights_key(args.hf)}
    if model.preprocess_cfg and (tuple(model.preprocess_cfg["mean"]), tuple(model.preprocess_cfg["std"])) != OPENAI:
        warnings.warn(f"{meta} was trained with mean {model.preprocess_cfg['mean']} / std "
                      f"{model.preprocess_cfg['std']}, but the analyses normalise images with OpenAI's; "
                      "activations are shifted accordingly", RuntimeWarning, stacklevel=2)
    ds = load_dataset(args.dataset, verify=getattr(args, "verify", None) or "none")
    return Source(model=model.eval(), model_key=f"model:{hash_obj(key)}", dataset=ds,
                  c2=list(ds.default_test_classes or []), test_domain=ds.default_test_domain, templates="auto",
                  out=Path(args.out), epoch=None, meta=meta)


def _weights_key(where: str | None) -> Any:
    """Content of local weights (file, or a folder's weight files), else the tag / hub id itself
    (a tag names fixed weights)."""
    from clipmech.utils import file_hash

    path = Path(str(where)) if where is not None else None
    if path is not None and path.is_file():
        return file_hash(path)
    if path is not None and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if files:
            return {p.name: file_hash(p) for p in files}
    return str(where)


def source_flags(args: argparse.Namespace) -> str:
    """The command-line words naming the analysed model, for hints like 'run `clipmech analyze sae ...` first'."""
    if args.run_dir:
        return shlex.quote(str(args.run_dir))
    words = ["--model", args.model, "--pretrained", str(args.pretrained)] if args.model else ["--hf", str(args.hf)]
    return shlex.join(words + ["--dataset", str(args.dataset), "--out", str(args.out)])
