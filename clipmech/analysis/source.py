"""What `clipmech analyze` runs on: a clipmech training run, or any CLIP someone else trained.

    clipmech analyze cka runs/cg_high-clipart                       # a run: its checkpoint, dataset, C2
    clipmech analyze cka --model RN50 --pretrained openai --dataset /data/domainnet --out runs/rn50
    clipmech analyze cka --hf openai/clip-vit-base-patch32 --dataset emoji --out runs/hf-b32

`add_source_arguments` adds these options to a subcommand; `load_source` turns them into a
`Source`: the model, the dataset, the held-out classes (C2) and test domain, the zero-shot
templates, the preprocessing (image size), the output folder and a content key of the weights for
activation caches. A run brings its own C2 classes, test domain and templates
(`source_from_run`, which also serves the per-run analysis units); any other model gets the
dataset's defaults. `Source` is the one answer to "what is analysed" for every analysis path.
"""
from __future__ import annotations

import argparse
import shlex
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # clipmech.utils imports torch; `clipmech --help` must not
    from clipmech.utils import PathLike

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
    """What is analysed: a model and the data around it (see the module docstring). The one object
    every analysis path reads: `clipmech analyze`, the per-run analysis units and the quickstart."""
    model_key: str  # content key of the weights: activation caches and unit keys use it
    dataset: Any  # clipmech.data.DomainDataset
    c2: list[str]  # held-out classes, as the dataset spells them: the run's, else the dataset's default
    test_domain: str | None
    templates: list[str]  # zero-shot templates, resolved (clipmech.eval.templates.get_templates)
    out: Path | None  # results folder (None where the caller places results itself)
    epoch: int | None  # the run's checkpoint epoch; None for other models
    meta: dict[str, Any]  # what was analysed, recorded in every result file
    loader: Callable[[], Any] = field(repr=False, compare=False)  # -> HookedCLIP (CPU)
    config: dict[str, Any] | None = None  # the run's resolved config; None for other models
    checkpoint: Path | None = None  # the analysed checkpoint file of a run
    paper_compat: bool = False  # the run config's [analysis] paper_compat (False for other models)

    @cached_property
    def model(self):
        """The HookedCLIP, loaded on first use, on CPU in eval mode."""
        return self.loader().eval()

    @property
    def label(self) -> str:
        """Names per-checkpoint result folders: `epoch3` for a run, `pretrained` otherwise."""
        return f"epoch{self.epoch}" if self.epoch is not None else "pretrained"

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def preprocessing(self) -> str:
        """The image preprocessing every analysis applies (resize, crop, normalisation)."""
        from clipmech.eval.zeroshot import eval_transform_description
        return eval_transform_description(self.image_size)

    @property
    def c2_idx(self) -> list[int]:
        return [self.dataset.classes.index(c) for c in self.c2]

    @property
    def untrained_checkpoint(self) -> Path | None:
        """A run's epoch_0.pt (the untrained model the controls use as a floor), else None."""
        if self.checkpoint is None:
            return None
        file = self.checkpoint.parent / "epoch_0.pt"
        return file if file.is_file() else None

    def head(self, model=None):
        """The zero-shot class head [K, d] of `model` (default: the source's) over the dataset's classes."""
        import torch

        from clipmech.eval.zeroshot import class_prompts_names
        with torch.no_grad():
            return (model or self.model).zero_shot_head(class_prompts_names(self.dataset), self.templates)

    def with_classes(self, classes: Sequence[str]) -> "Source":
        """The same source on a subset of the dataset's classes; ValueError when it drops a C2 class."""
        missing = [c for c in self.c2 if c not in classes]
        if missing:
            raise ValueError(f"the class subset leaves out the C2 classes {missing}; keep them")
        return replace(self, dataset=self.dataset.select_classes(list(classes)))


def c2_names(dataset, names: Sequence[str] | None, where: str) -> list[str]:
    """`names` (else the dataset's default C2) as the dataset spells them; ValueError naming `where`
    when there are none or one is unknown."""
    names = list(names or dataset.default_test_classes or [])
    if not names:
        raise ValueError(f"{where}: no C2 classes ([mixture] test_classes unset and dataset {dataset.name!r} "
                         "has no default)")
    return [dataset.classes[dataset.class_index(c)] for c in names]


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
        source = source_from_run(args.run_dir, epoch=args.checkpoint, dataset=args.dataset,
                                 verify=getattr(args, "verify", None))
        return replace(source, out=Path(args.out) if args.out else Path(args.run_dir) / RESULTS)
    if not external:
        raise ValueError("nothing to analyse: give RUN_DIR, --model NAME --pretrained TAG_OR_PATH, or --hf PATH")
    source = _from_model(args)
    source.model  # noqa: B018 -- load now: a bad tag or file is reported before any work
    return source


def source_from_run(run_dir: PathLike, epoch: int | None = None, dataset: str | None = None,
                    verify: str | None = None, finished: bool = False) -> Source:
    """A training run as a Source: its checkpoint `epoch` (None: the last saved; `finished`: the
    config's last epoch, refused while training is unfinished), its dataset (or `dataset`), C2
    classes, test domain and templates from its config.toml. The model loads on first use and is
    checked against the config's image size. Cost: reading the config, hashing the checkpoint,
    opening the dataset."""
    from clipmech.data import load_dataset
    from clipmech.eval.templates import get_templates
    from clipmech.models.configs import model_config
    from clipmech.models.hooked_clip import HookedCLIP
    from clipmech.train.run_dir import checkpoint, final_checkpoint, run_config
    from clipmech.utils import file_hash

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if finished:
        file = final_checkpoint(run_dir, cfg)
        epoch = int(cfg["train"]["epochs"])
    else:
        epoch, file = checkpoint(run_dir, epoch)
    want = model_config(cfg)[1]["vision_cfg"]["image_size"]

    def load():
        model = HookedCLIP.from_checkpoint(file)
        if model.image_size != want:
            raise ValueError(f"{file} takes {model.image_size} px images but {run_dir}/config.toml says {want}; "
                             "the checkpoint does not belong to this config")
        return model

    ds = load_dataset(dataset or str(cfg["data"]["dataset"]), verify=verify or cfg["data"]["verify"])
    return Source(model_key=f"file:{file_hash(file)}", dataset=ds, c2=c2_names(ds, cfg["mixture"]["test_classes"],
                                                                                 str(run_dir)),
                  test_domain=cfg["mixture"]["test_domain"] or ds.default_test_domain,
                  templates=get_templates(cfg["eval"]["templates"], ds.name), out=None, epoch=epoch,
                  meta={"run_dir": str(run_dir), "checkpoint": str(file), "epoch": epoch}, loader=load, config=cfg,
                  checkpoint=file, paper_compat=bool(cfg["analysis"]["paper_compat"]))


def _from_model(args: argparse.Namespace) -> Source:
    from clipmech.data import load_dataset
    from clipmech.eval.templates import get_templates
    from clipmech.models.hooked_clip import HookedCLIP
    from clipmech.utils import hash_obj

    flag = "--model" if args.model else "--hf"
    if args.checkpoint is not None:
        raise ValueError(f"--checkpoint picks an epoch of a RUN_DIR; it does not apply to {flag}")
    for option, value in (("--dataset", args.dataset), ("--out", args.out)):
        if not value:
            raise ValueError(f"{flag} needs {option} (e.g. --dataset emoji --out runs/my-model)")
    if args.model:
        meta = {"model": args.model, "pretrained": str(args.pretrained)}
        key = {"open_clip": args.model, "weights": _weights_key(args.pretrained)}
        load = lambda: _warn_other_normalisation(  # noqa: E731
            HookedCLIP.from_pretrained(args.model, args.pretrained), meta)
    else:
        meta, key = {"hf": str(args.hf)}, {"hf": _weights_key(args.hf)}
        load = lambda: _warn_other_normalisation(HookedCLIP.from_hf(args.hf), meta)  # noqa: E731
    ds = load_dataset(args.dataset, verify=getattr(args, "verify", None) or "none")
    return Source(model_key=f"model:{hash_obj(key)}", dataset=ds, c2=list(ds.default_test_classes or []),
                  test_domain=ds.default_test_domain, templates=get_templates("auto", ds.name), out=Path(args.out),
                  epoch=None, meta=meta, loader=load)


def _warn_other_normalisation(model, meta: dict[str, Any]):
    """`model`, after warning when its training normalisation differs from the OpenAI one the analyses use."""
    from clipmech.models.pretrained import OPENAI_MEAN_STD as OPENAI
    if model.preprocess_cfg and (tuple(model.preprocess_cfg["mean"]), tuple(model.preprocess_cfg["std"])) != OPENAI:
        warnings.warn(f"{meta} was trained with mean {model.preprocess_cfg['mean']} / std "
                      f"{model.preprocess_cfg['std']}, but the analyses normalise images with OpenAI's; "
                      "activations are shifted accordingly", RuntimeWarning, stacklevel=3)
    return model


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
