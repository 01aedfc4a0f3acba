"""`clipmech quickstart`: the paper's whole study, end to end, on the embedded emoji domains.

For each test domain and seed it trains the four main setups (natural-only, leave-out-domain,
CG low-diversity, CG high-diversity) with a tiny open_clip model (`clipmech.train`), evaluates
DG/CG zero-shot accuracy (`clipmech.eval`), and per model runs domain CKA per analysis point
(`clipmech.analysis.cka`), per-class circuits with node and edge similarity
(`clipmech.analysis.circuits`), SAE feature sharing (`clipmech.analysis.sae` / `.sharing`) and
embedding separation (`clipmech.analysis.embeddings`). It then relates every sharedness measure to
C2 accuracy across all models and writes figures, `results.json` and `report.md`.

Training and evaluation are the quickstart's own; the per-model analysis is the per-run analysis
plan (`clipmech.study.plan`: CKA, circuits, SAE, embeddings, controls) under the quickstart's preset,
the same stages `clipmech experiment analyse` runs. Each stage is stored in a `Registry` keyed by its
inputs (config, checkpoint hash, dataset hash), so a rerun skips finished work and a changed option
recomputes only what depends on it. `--dataset ROOT` runs the same preset on a DomainNet-layout folder.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipmech.analysis.discovery import CIRCUIT_METHODS
from clipmech.analysis.source import Source
from clipmech.data import load_dataset
from clipmech.data.mixtures import build_mixture
from clipmech.data.samples import distinct_drawings
from clipmech.eval.templates import get_templates
from clipmech.eval.zeroshot import class_prompts_names, embed_images, group_metrics
from clipmech.models.hooked_clip import HookedCLIP
from clipmech.study import figures as F
from clipmech.study.controls import FIGURE_NOTES as CONTROLS_FIGURES
from clipmech.study.circuit_sets import cell_circuits, circuit_cells
from clipmech.study.controls import controls_budget, draw_controls_figures
from clipmech.analysis.explanations import PER_FIGURE, ImageSet, explain_nodes, select_circuit_nodes
from clipmech.study.plan import STAGE_VERSION, ImageStore, Preset, RunAnalysis, cka_pairs, row_measures
from clipmech.study.plan import stages as plan_stages
from clipmech.study.progress import Progress
from clipmech.study.provenance import provenance
from clipmech.study.registry import Registry
from clipmech.study.report import MAIN_SETUPS, SHAREDNESS_MEASURES, build_results, setup_summary, write_outputs
from clipmech.train.trainer import train
from clipmech.utils import file_hash, hash_obj, unknown_name_error

# The quickstart's default test domains. Not the emoji dataset's default (quickdraw, the domain with
# the largest DG gap): on quickdraw a 10-minute tiny CLIP gets 0-1 of the 15 held-out-class images
# right in every setup (measured: C2 0.0-6.7 %, C1 1-20 %), so nothing can be compared. On clipart
# and painting the same budget gives C2 accuracies of 7-60 % that differ between setups.
QUICKSTART_TEST_DOMAINS = ("clipart", "painting")  # on any dataset that has them (`default_test_domains`)
MIN_CLASSES = 8  # 4 C2 + 4 C1: the fewest classes the setups and the statistics can work with


@dataclass(frozen=True)
class QuickstartOptions:
    """Everything that determines the quickstart's results (hashed into the registry keys).

    Defaults are sized for <= 10 minutes on a 2-core CPU (see `plan_budgets`); the paper's values
    are noted where the defaults differ.
    """

    out: str = "runs/quickstart"
    dataset: str = "emoji"
    views: int = 4  # emoji only: training views per drawing (builder default 16); with < 4 views the
    # mixtures' deterministic trimming empties whole domains and LOD / CG-high coincide (checked below)
    test_domains: tuple[str, ...] | None = None  # None: `default_test_domains`
    seeds: int = 3  # training seeds per setup; the statistics resample them (issue 12: power)
    setups: tuple[str, ...] = MAIN_SETUPS
    model: str = "tiny-rn"  # the paper used RN50; tiny-vit trains ~2x faster per step but learns far less
    # in this budget (cg_high, 60 classes, 30 epochs: clipart C1 29 % vs 49 % for tiny-rn)
    image_size: int = 32
    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-3
    curve_points: int = 5  # checkpoints evaluated for the accuracy-over-epochs curve (last always)
    n_templates: int = 7  # first templates of the dataset's set for zero-shot heads (paper: all 86)
    # C2 + the first C1 classes; None = all 459. With all classes a 10-minute run stays at the floor
    # (cg_high, 12 epochs: painting C1 21 %, held-out C2 on quickdraw 0 of 15 images).
    max_classes: int | None = 100
    # Held-out (C2) classes: the dataset's 15 defaults, extended by the same rule (smallest
    # sha256(class name)). Power: with 3 seeds, 45 classes x 2 drawings keep the 95% CI half-width of
    # each main contrast pooled over 2 test domains at <= 15 points (see report.md's pilot curve).
    n_c2: int = 45
    # Score C2 on every unseen drawing of the test domain: in the natural-only, LOD and CG setups the
    # test domain's C2 drawings of BOTH splits are never trained on, so the train split's original
    # drawings (view 0, not the augmented views) join the test split's: 2 distinct drawings per cell.
    c2_both_splits: bool = True
    circuit_steps: int = 10  # IG Riemann steps for circuits (paper: 10)
    # C2 classes with a circuit per domain (paper: all 15). 8: the analysis plan's causal test needs >= 8
    # classes (an exact sign-flip test over n classes cannot give p below 2^-n; 5 classes: 1/32 > alpha/2)
    circuit_classes: int = 8
    sae_expansion: int = 4  # latents = expansion x embedding width (paper: 4)
    # Adam steps at batch 256, lr 3e-3 (clipmech.study.saes: the measured choice; 100 passes over the
    # default run's 2,612 training embeddings)
    sae_steps: int = 1100
    cka_boot: int = 50
    circuit_method: str = "paper_ig"  # or "eap_ig" (clipmech.study.plan.Preset.circuit_method)
    reference_images: int | None = None  # per domain in a mean-ablation reference; None: all (Preset)
    train_workers: int = 2  # models trained at once, each in its own process (see train_models)
    progress: bool = True

    def validate(self) -> "QuickstartOptions":
        """Check every option's type and range (ConfigError naming the option); returns self."""
        from clipmech.data.mixtures import SETUPS
        from clipmech.train.config import ConfigError, check_typed
        for name, (kind, rule) in _OPTION_TYPES.items():
            check_typed(f"quickstart option {name}", getattr(self, name), kind, rule)
        domains = None if self.test_domains is None else list(self.test_domains)
        check_typed("quickstart option test_domains", domains, "list[str]?")
        if not self.setups or any(s not in SETUPS for s in self.setups):
            raise ConfigError(f"quickstart option setups = {self.setups!r}; choose from {', '.join(SETUPS)}")
        return self

    def preset(self) -> Preset:
        """The per-run analysis plan's settings (clipmech.study.plan.Preset) these options choose."""
        return Preset(circuit_steps=self.circuit_steps, circuit_classes=self.circuit_classes,
                      sae_expansion=self.sae_expansion, sae_steps=self.sae_steps, cka_boot=self.cka_boot,
                      n_templates=self.n_templates, circuit_method=self.circuit_method,
                      reference_images=self.reference_images)


# Types and ranges of the scalar options (clipmech.train.config.SCHEMA notation).
_OPTION_TYPES = {"out": ("str", None), "dataset": ("str", None), "views": ("int", ">=1"), "seeds": ("int", ">=1"),
                 "model": ("str", None), "image_size": ("int", ">=1"), "epochs": ("int", ">=1"),
                 "batch_size": ("int", ">=1"), "lr": ("float", ">0"), "curve_points": ("int", ">=1"),
                 "n_templates": ("int", ">=1"), "max_classes": ("int?", ">=1"), "circuit_steps": ("int", ">=1"),
                 "circuit_classes": ("int", ">=1"), "sae_expansion": ("int", ">=1"), "sae_steps": ("int", ">=1"),
                 "cka_boot": ("int", ">=0"), "n_c2": ("int", ">=1"), "circuit_method": ("str", CIRCUIT_METHODS),
                 "reference_images": ("int?", ">=1"), "c2_both_splits": ("bool", None),
                 "train_workers": ("int", ">=1"), "progress": ("bool", None)}



@dataclass
class ModelSpec:
    """One trained model: natural-only is trained once per seed and evaluated on every test domain."""

    setup: str
    seed: int
    test_domain: str
    domains: str | None = None  # included domain initials (`build_mixture(domains=)`); None: the setup's own
    epochs: int | None = None  # None: the options' epochs (a steps-matched model trains longer)
    label: str | None = None  # the results row's "setup" (default: `setup`)

    @property
    def name(self) -> str:
        """The row's setup label: `label`, else `setup`."""
        return self.label or self.setup

    @property
    def run_id(self) -> str:
        if self.setup == "natural_only" and self.label is None:
            return f"natural_only-s{self.seed}"
        return f"{self.name}-{self.test_domain}-s{self.seed}"

    def train_epochs(self, opts: "QuickstartOptions") -> int:
        return self.epochs or opts.epochs


@dataclass
class Study:
    """State shared by the stages of one quickstart run: the dataset, test domains and C2 classes, the
    registry, and the preprocessed images every model reuses (`clipmech.study.plan.ImageStore`)."""

    opts: QuickstartOptions
    dataset: Any = None
    test_domains: list[str] = field(default_factory=list)
    c2: list[str] = field(default_factory=list)
    registry: Registry | None = None
    store: ImageStore | None = None

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    def images(self, split: str) -> torch.Tensor:
        """Preprocessed images of a split, float32 [N, 3, S, S] in `dataset.indices(split)` order."""
        return self.store.images(split)

    def templates(self) -> list[str]:
        """The zero-shot templates: the first `n_templates` of the dataset's template set."""
        return get_templates("auto", self.dataset.name)[: self.opts.n_templates]

    def run_analysis(self, run: dict[str, Any], test_domain: str | None) -> RunAnalysis:
        """The per-run analysis plan's view of one trained model (its final checkpoint) under the
        quickstart's preset."""
        source = Source(model_key=f"file:{run['checkpoint_hash']}", dataset=self.dataset, c2=list(self.c2),
                        test_domain=test_domain, templates=self.templates(), out=None, epoch=self.opts.epochs,
                        meta={"run_dir": run["run_dir"], "checkpoint": run["checkpoint"]},
                        loader=lambda: HookedCLIP.from_checkpoint(run["checkpoint"]),
                        checkpoint=Path(run["checkpoint"]))
        return RunAnalysis(source, self.opts.preset(), self.registry, self.store)


def default_test_domains(ds) -> list[str]:
    """QUICKSTART_TEST_DOMAINS present in `ds`, else its default test domain, else its first
    non-natural domain."""
    found = [d for d in QUICKSTART_TEST_DOMAINS if d in ds.domains]
    return found or [ds.default_test_domain or next(d for d in ds.domains if d != ds.natural_domain)]


def scaled_to_data(opts: QuickstartOptions, n_classes: int) -> QuickstartOptions:
    """`opts` with `n_c2` and `max_classes` capped to what a dataset of `n_classes` classes holds
    (at least 4 C1 classes stay); ValueError when it has fewer than MIN_CLASSES classes."""
    if n_classes < MIN_CLASSES:
        raise ValueError(f"dataset {opts.dataset!r} has {n_classes} classes; the quickstart needs at least "
                         f"{MIN_CLASSES} (4 held-out C2 + 4 C1)")
    n_c2 = min(opts.n_c2, n_classes - 4)
    max_classes = None if opts.max_classes is None else min(opts.max_classes, n_classes)
    return replace(opts, n_c2=n_c2, max_classes=max_classes)


def resolve_dataset(opts: QuickstartOptions) -> tuple[Any, list[str], list[str]]:
    """(dataset, test domains, C2 class names); applies `max_classes` by keeping C2 first. On a dataset
    other than the embedded emoji one, `n_c2` and `max_classes` are capped to its classes (`scaled_to_data`)."""
    ds = load_dataset(opts.dataset, **({"views": opts.views} if opts.dataset == "emoji" else {}))
    if opts.dataset != "emoji":
        opts = scaled_to_data(opts, len(ds.classes))
    c2 = extend_c2(list(ds.default_test_classes or []), ds.classes, opts.n_c2)
    if not c2:
        raise ValueError(f"dataset {opts.dataset!r} defines no default C2 classes; the quickstart needs them")
    domains = list(opts.test_domains or default_test_domains(ds))
    for d in domains:
        if d not in ds.domains:
            raise unknown_name_error("test domain", d, ds.domains)
        if d == ds.natural_domain:
            raise ValueError(f"the natural domain {d!r} cannot be a test domain; choose one of "
                             f"{[x for x in ds.domains if x != ds.natural_domain]}")
    if opts.max_classes is not None:
        if opts.max_classes < len(c2) + 4:
            raise ValueError(f"max_classes={opts.max_classes} is too small: it must keep the {len(c2)} C2 "
                             "classes and at least 4 C1 classes")
        keep = c2 + [c for c in ds.classes if c not in c2][: opts.max_classes - len(c2)]
        ds = ds.select_classes(keep)
    return ds, domains, c2


def extend_c2(default: Sequence[str], classes: Sequence[str], n: int) -> list[str]:
    """`default` C2 classes, then the other classes of smallest sha256(name) up to `n` (the rule the
    emoji builder uses to fill its 15 defaults). n <= len(default) keeps the defaults."""
    if n > len(classes) - 4:
        raise ValueError(f"n_c2={n} leaves fewer than 4 C1 classes of {len(classes)}; choose n_c2 <= {len(classes) - 4}")
    rest = sorted((c for c in classes if c not in default), key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    return list(default) + rest[: max(0, n - len(default))]


def model_specs(opts: QuickstartOptions, test_domains: Sequence[str]) -> list[ModelSpec]:
    """Every (setup, seed, test domain) row of the results table, in training order."""
    return [ModelSpec(s, seed, d) for d in test_domains for seed in range(opts.seeds) for s in opts.setups]


def plan_budgets(opts: QuickstartOptions, specs: Sequence[ModelSpec], dataset) -> dict[str, float]:
    """Planned stages and their expected seconds on an idle 2-core CPU (tiny-rn, 32 px).

    Unit costs were measured on the development machine; they only drive the remaining-time
    estimate, which rescales itself by the observed speed as stages finish.
    """
    counts = dataset.counts(split="train")
    size = counts[dataset.domain_index(dataset.natural_domain)].sum() * 2  # S(d*) ~ natural + test domain
    steps = opts.epochs * math.ceil(size / opts.batch_size)
    n_classes = int((counts.sum(0) > 0).sum())
    images = len(dataset) * 3e-3  # eval preprocessing, ~3 ms per image
    budgets: dict[str, float] = {"load data": 1.0 + images}
    run_ids = list(dict.fromkeys(s.run_id for s in specs))
    # two one-thread workers train about 1.4x faster than one two-thread process (measured on tiny-rn)
    speedup = 1.4 if opts.train_workers > 1 and len(run_ids) > 1 else 1.0
    budgets["train"] = 0.12 * steps * opts.batch_size / 64 * len(run_ids) / speedup
    for r in run_ids:
        budgets[f"evaluate {r}"] = len(curve_epochs(opts.epochs, opts.curve_points)) * (1.0 + n_classes * opts.n_templates * 5e-4)
    for s in specs:
        tag = f"{s.run_id} on {s.test_domain}"
        budgets[f"CKA {tag}"] = 4.0
        budgets[f"circuits {tag}"] = 6 * opts.circuit_classes * 0.02 * opts.circuit_steps
        budgets[f"SAE {tag}"] = 2.0 + 0.002 * opts.sae_steps
        budgets[f"embeddings {tag}"] = 5.0
        budgets[f"controls {tag}"] = controls_budget(opts)  # issue 13
    budgets["figures and report"] = 15.0  # includes UMAP of the figure model
    return budgets


# ------------------------------------------------------------------------------------ stages
def _mixture_test_domain(spec: ModelSpec) -> str | None:
    """Natural-only is one model for every test domain, so its mixture names none."""
    return None if spec.setup == "natural_only" else spec.test_domain


def _train_config(opts: QuickstartOptions, spec: ModelSpec, c2: Sequence[str], run_dir: Path) -> dict:
    """A clipmech.train config (see clipmech.train.config.DEFAULTS) for one model."""
    return {
        "model": {"name": opts.model, "image_size": opts.image_size},
        "data": {"dataset": opts.dataset},
        "mixture": {"setup": spec.setup, "test_domain": _mixture_test_domain(spec), "test_classes": list(c2),
                    **({"domains": spec.domains} if spec.domains else {})},
        "optim": {"lr": opts.lr},
        "schedule": {"warmup": 50},
        "train": {"epochs": spec.train_epochs(opts), "batch_size": opts.batch_size, "seed": spec.seed,
                  "out": str(run_dir), "tensorboard": False, "progress": False,
                  # only the checkpoints the accuracy curve reads (each tiny-rn checkpoint is ~18 MB)
                  "save_epochs": curve_epochs(spec.train_epochs(opts), opts.curve_points)},
        "eval": {"templates": "auto"},
    }


def _train_plan(study: Study, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(registry key, training config, run folder) of one model."""
    cfg = _train_config(study.opts, spec, study.c2, Path("."))
    key = {"stage": "train", "version": STAGE_VERSION, "dataset": study.dataset.content_hash(),
           "config": cfg | {"train": {**cfg["train"], "out": None}}}
    # The key's hash in the folder name: changed options train into a new folder, never over an old run.
    run_dir = study.out / "runs" / f"{spec.run_id}-{study.registry.path('train', key).stem[:8]}"
    cfg["train"]["out"] = str(run_dir)
    return key, cfg, run_dir


def _train_run(dataset, c2: Sequence[str], spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one model from its config (resuming an interrupted run); the registry record."""
    run_dir = Path(cfg["train"]["out"])
    mixture = build_mixture(dataset, spec.setup, test_domain=_mixture_test_domain(spec), test_classes=list(c2),
                            domains=spec.domains, split="train", seed=42)
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, mixture=mixture, resume=(run_dir / "latest.pt").is_file())
    ckpt = run_dir / f"epoch_{cfg['train']['epochs']}.pt"
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt), "checkpoint_hash": file_hash(ckpt),
            "n_train": int(len(mixture.indices)), "mixture_id": mixture.id,
            "mixture_hash": hash_obj(sorted(mixture.indices.tolist())),
            "train_wall_s": round(time.perf_counter() - t0, 2), "train_cpu_s": round(time.process_time() - c0, 2)}


# A training worker process keeps its dataset between the models it trains.
_WORKER: dict[str, Any] = {}


def _worker_init(opts: QuickstartOptions, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["dataset"] = resolve_dataset(opts)[0]


def _worker_train(c2: list[str], spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    return _train_run(_WORKER["dataset"], c2, spec, cfg)


def train_models(study: Study, specs: Sequence[ModelSpec]) -> dict[str, dict[str, Any]]:
    """Train (or reuse) every distinct model of `specs`; {run_id: registry record + "reused"}.

    With `train_workers` > 1 the models to train run in that many spawned processes, each on
    cpu_count // train_workers threads: the tiny models do not keep two cores busy in one process
    (small convolutions, a single-threaded data pipeline), two one-thread processes do. Each process
    loads the dataset once (a few seconds). Results do not depend on the worker count beyond
    floating-point summation order.
    """
    runs: dict[str, dict[str, Any]] = {}
    todo: list[tuple[ModelSpec, dict, dict]] = []
    for spec in dict((s.run_id, s) for s in specs).values():
        key, cfg, _ = _train_plan(study, spec)
        found = study.registry.get("train", key)
        if found is not None and Path(found["checkpoint"]).is_file() and file_hash(found["checkpoint"]) == found["checkpoint_hash"]:
            runs[spec.run_id] = found | {"reused": True}
        else:
            todo.append((spec, key, cfg))
    workers = min(study.opts.train_workers, len(todo))
    if workers <= 1:
        records = [_train_run(study.dataset, study.c2, spec, cfg) for spec, _, cfg in todo]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=(study.opts, threads)) as pool:
            futures = [pool.submit(_worker_train, list(study.c2), spec, cfg) for spec, _, cfg in todo]
            records = [f.result() for f in futures]
    for (spec, key, _), record in zip(todo, records):
        runs[spec.run_id] = study.registry.put("train", key, record) | {"reused": False}
    return runs


def curve_epochs(epochs: int, points: int) -> list[int]:
    """Checkpoints evaluated for the accuracy curve: `points` epochs spread over 0..epochs (last included)."""
    return sorted({int(round(x)) for x in np.linspace(0, epochs, max(points, 2))})


def evaluate_model(study: Study, run: dict[str, Any], spec: ModelSpec) -> tuple[dict[str, dict[str, float]], bool]:
    """Zero-shot metrics of the curve checkpoints of a run: {epoch: {"{domain}/{C1|C2}/top1_balanced": ...}}.

    Prediction = argmax cosine to the template-ensemble class heads (HookedCLIP.zero_shot_head) over
    all classes; metrics from clipmech.eval.zeroshot.group_metrics on the whole test split. With
    `c2_both_splits`, "{d}/C2_unseen/..." adds C2 metrics over every drawing of a domain d the run
    never trained on (`unseen_c2_rows`).
    """
    epochs = curve_epochs(spec.train_epochs(study.opts), study.opts.curve_points)
    ckpts = {e: Path(run["run_dir"]) / f"epoch_{e}.pt" for e in epochs}
    key = {"stage": "evaluate", "checkpoints": {e: file_hash(p) for e, p in ckpts.items()},
           "dataset": study.dataset.content_hash(), "c2": study.c2, "templates": study.templates(),
           "both_splits": study.opts.c2_both_splits, "version": STAGE_VERSION}

    def compute() -> dict:
        out = {}
        ds = study.dataset
        idx = ds.indices(split="test")
        extra = unseen_c2_rows(study, spec) if study.opts.c2_both_splits else np.zeros(0, dtype=int)
        for e, path in ckpts.items():
            model = HookedCLIP.from_checkpoint(path).eval()
            with torch.no_grad():
                head = model.zero_shot_head(class_prompts_names(ds), study.templates())
                scores = embed_images(model, study.images("test")) @ head.T
            flat, details = group_metrics(scores, ds, idx, study.c2)
            # Per-class accuracies give the report's class-level bootstrap CIs.
            out[str(e)] = flat | {"per_class": {k: v["per_class"] for k, v in details.items() if k != "skipped"}}
            if extra.size:
                with torch.no_grad():
                    extra_scores = embed_images(model, study.images("train")[extra]) @ head.T
                tr = ds.indices(split="train")[extra]
                both, both_details = group_metrics(torch.cat([scores, extra_scores]), ds, np.concatenate([idx, tr]),
                                                   study.c2)
                for d in {ds.domains[i] for i in ds.domain_idx[tr]}:
                    out[str(e)] |= {k.replace("/C2/", "/C2_unseen/"): v for k, v in both.items()
                                    if k.startswith(f"{d}/C2/")}
                    out[str(e)]["per_class"][f"{d}/C2_unseen"] = both_details[f"{d}/C2"]["per_class"]
        return out

    return study.registry.run("evaluate", key, compute)


def unseen_c2_rows(study: Study, spec: ModelSpec) -> np.ndarray:
    """Positions in `images("train")` of the original drawings (view 0) of C2 classes in the domains the
    run never trained C2 on: the test domain (natural-only: every non-natural domain)."""
    ds = study.dataset
    tr = ds.indices(split="train")
    domains = [d for d in ds.domains if d != ds.natural_domain] if spec.setup == "natural_only" else [spec.test_domain]
    keep = distinct_drawings(ds)[tr] & np.isin(ds.class_idx[tr], _c2_idx(study)) & np.isin(ds.domain_idx[tr],
                                                                              [ds.domain_index(d) for d in domains])
    return np.flatnonzero(keep)


def c2_drawings(study: Study, test_domain: str) -> dict[str, int]:
    """{C2 class: distinct drawings of `test_domain` its C2 accuracy averages} (test split, plus the
    train split's originals with `c2_both_splits`)."""
    ds = study.dataset
    test = ds.indices(split="test")
    extra = unseen_c2_rows(study, ModelSpec("lod", 0, test_domain)) if study.opts.c2_both_splits else np.zeros(0, int)
    classes = np.concatenate([ds.class_idx[test][ds.domain_idx[test] == ds.domain_index(test_domain)],
                              ds.class_idx[ds.indices(split="train")[extra]]])
    return {ds.classes[k]: int((classes == k).sum()) for k in _c2_idx(study)}


def drawings_per_cell(study: Study) -> str:
    """Distinct C2 drawings per (test domain, class) that the C2 accuracy averages, e.g. "2" or "1-3"."""
    counts = [n for d in study.test_domains for n in c2_drawings(study, d).values()]
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _c2_idx(study: Study) -> list[int]:
    return [study.dataset.classes.index(c) for c in study.c2]


def node_figures(ra: RunAnalysis, test_domain: str, fig_dir: Path, out: Path, per_domain: int = 8,
                 model_id: str | None = None) -> dict[str, str]:
    """The report's node figures (issue 29): the top PER_FIGURE shared and test-domain-only nodes of
    the model's C2 circuits on `test_domain` (the stored circuit set of the per-run plan), labelled with
    the study's class names in its templates, explained on up to `per_domain` C2 test images per
    domain, top examples among 2 x `per_domain` test images per domain -> fig_dir/explain/
    (explanations.json, thumbs, nodes_<group>.png). Returns {figure path: note}; empty when no
    other domain has circuits. `model_id` (the results row's model) goes into the file's meta, so
    `clipmech view` puts the nodes on that model's page. Cost: one segment forward per node over the
    sample and one forward over the pool."""
    ds, model = ra.dataset, ra.model
    test_cells, _ = circuit_cells(ra)
    circuits, _ = cell_circuits(ra, model, ra.checkpoint_hash, test_cells, "test")
    classes = sorted(circuits.get(test_domain, {}))
    if not classes or sum(1 for per in circuits.values() if per) < 2:
        return {}
    nodes, found = select_circuit_nodes(circuits, test_domain, classes, PER_FIGURE)
    test = ds.indices(split="test")
    rng = np.random.default_rng(0)
    dom, cls = ds.domain_idx[test], ds.class_idx[test]
    sample = np.concatenate([np.sort(rng.permutation(np.flatnonzero((dom == d) & np.isin(cls, classes)))[:per_domain])
                             for d in range(len(ds.domains))])
    pool_rows = np.concatenate([np.sort(rng.permutation(np.flatnonzero(dom == d))[:2 * per_domain])
                                for d in range(len(ds.domains))])
    names = class_prompts_names(ds)
    with torch.no_grad():
        words = model.zero_shot_head(names, ra.templates())
    present, labels = np.unique(cls[sample], return_inverse=True)
    images = ra.images("test")
    pool_set = ImageSet(images[pool_rows], dom[pool_rows], sources=[ds.source_key(int(i)) for i in test[pool_rows]],
                        classes=[ds.classes[int(k)] for k in cls[pool_rows]])
    meta = {"model_id": model_id, "test_domain": test_domain, "circuits": found, "model": ra.checkpoint_hash,
            "vocabulary": {"source": "the study's class names", "n_words": len(names), "dropped": 0}}
    _, paths = explain_nodes(model, nodes, ImageSet(images[sample], dom[sample], torch.as_tensor(labels)),
                             words[torch.as_tensor(present)], pool_set, ds.domains, names, words,
                             fig_dir / "explain", meta=meta)
    notes = {"shared": f"Top {PER_FIGURE} nodes of the {test_domain} C2 circuits also in another domain's circuit "
                       "of the class: text labels with the share of the node's effect each explains (chance and "
                       "ceiling beside), per domain the top-activating test image with the node's map, its mean "
                       "activation and ablation effect on the true-class logit (docs/explain.md).",
             "test_domain_only": f"As nodes_shared, for the nodes of the {test_domain} C2 circuits in no other "
                                 "domain's circuit."}
    return {str(p.relative_to(out)): notes.get(p.stem.removeprefix("nodes_"), "") for p in paths}


# ------------------------------------------------------------------------------------ the study
FIGURE_NOTES = {
    "fig2_c2_accuracy.png": "C2 (held-out class) accuracy on the test domain per setup, mean and 95% bootstrap CI over seeds and C2 classes (Fig. 2 analogue).",
    "accuracy_over_epochs.png": "C2 accuracy on the test domain over training epochs, per setup.",
    "cka_per_layer.png": "Class-centroid linear CKA per analysis point for every domain pair of the CG-high model; the test domain's pairs are coloured.",
    "circuit_jaccard.png": "Node and edge Jaccard of per-class circuits between domains (CG-high model, C2 classes).",
    "umap_by_domain.png": "UMAP of the CG-high model's test embeddings, coloured by domain.",
    "feature_sharing.png": "SAE feature-sharing matrix over C2 classes (CG-high model, paper Alg. 1-2).",
    "sharedness_vs_c2.png": "Each sharedness measure against C2 accuracy across all models, with the within-domain Spearman correlation (averaged over test domains) and its bootstrap CI.",
}


def _final_metrics(metrics: dict[str, dict[str, Any]], domain: str) -> tuple[dict[str, Any], list[float]]:
    """(model-row accuracy fields at the last epoch, C2 accuracy per epoch) for test domain `domain`:
    C1/C2 class-balanced top-1 and their per-class accuracies. C2 is over every unseen drawing when
    the evaluation has "{domain}/C2_unseen" (then `c2_test_split_acc` keeps the test split's alone)."""
    epochs = sorted(metrics, key=int)
    try:
        last = metrics[epochs[-1]]
        c2 = "C2_unseen" if f"{domain}/C2_unseen/top1_balanced" in last else "C2"
        row = {f"{g.lower()}_test_acc": last[f"{domain}/{k}/top1_balanced"] for g, k in (("C1", "C1"), ("C2", c2))}
        row |= {f"{g.lower()}_test_acc_per_class": last["per_class"][f"{domain}/{k}"]
                for g, k in (("C1", "C1"), ("C2", c2))}
        row["c2_test_split_acc"] = last[f"{domain}/C2/top1_balanced"]
        curve = [metrics[e][f"{domain}/{c2}/top1_balanced"] for e in epochs]
    except KeyError as err:
        raise RuntimeError(f"evaluation results lack {err} for test domain {domain!r}; "
                           f"keys look like {sorted(metrics[epochs[-1]])[:4]}") from None
    return row, curve


def check_distinct_mixtures(specs: Sequence[ModelSpec], runs: dict[str, dict[str, Any]]) -> None:
    """Refuse to compare setups whose training samples coincide (a degenerate mixture would make,
    e.g., LOD and CG-high the same model and every comparison between them meaningless)."""
    for d in {s.test_domain for s in specs}:
        seen: dict[str, str] = {}
        for s in specs:
            if s.test_domain != d or s.seed != specs[0].seed:
                continue
            h = runs[s.run_id]["mixture_hash"]
            if h in seen:
                raise RuntimeError(f"the {seen[h]} and {s.setup} mixtures for test domain {d!r} hold the same "
                                   "training samples; with few samples per (domain, class) bucket the "
                                   "subsampling trims whole domains. Use more emoji views (--views 4 or more).")
            seen[h] = s.setup


def open_study(opts: QuickstartOptions, test_domains: Sequence[str] | None = None) -> Study:
    """The validated options' dataset, test domains (`test_domains` overrides the options'), C2 classes,
    registry and image store under `opts.out`."""
    opts.validate()
    study = Study(opts, registry=Registry(Path(opts.out) / "registry"))
    study.dataset, study.test_domains, study.c2 = resolve_dataset(opts)
    if test_domains is not None:
        study.test_domains = list(test_domains)
    study.store = ImageStore(study.dataset, opts.image_size, study.out / "cache")
    return study


def train_and_evaluate(study: Study, specs: Sequence[ModelSpec], progress: Progress
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, dict]]:
    """Load the images, train (or reuse) and evaluate every distinct model of `specs`:
    ({run_id: train record}, {run_id: evaluate_model metrics})."""
    with progress.stage("load data") as h:
        h.reused = study.store.cached("test") and study.store.cached("train")
        study.images("test"), study.images("train")
    runs: dict[str, dict[str, Any]] = {}
    metrics: dict[str, dict] = {}
    with progress.stage("train") as h:
        runs.update(train_models(study, specs))
        h.reused = all(r["reused"] for r in runs.values())
    for spec in dict((s.run_id, s) for s in specs).values():
        with progress.stage(f"evaluate {spec.run_id}") as h:
            metrics[spec.run_id], h.reused = evaluate_model(study, runs[spec.run_id], spec)
    return runs, metrics


def analyse_models(study: Study, specs: Sequence[ModelSpec], runs: dict[str, dict[str, Any]],
                   metrics: dict[str, dict], progress: Progress, figure_spec: ModelSpec
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list]], dict[tuple[str, str], dict]]:
    """Run the per-run analysis plan on every (model, test domain) of `specs`: (results rows, C2 accuracy
    curves {test domain: {setup: [curve per seed]}}, {(run_id, test domain): stage results}). UMAP only
    for `figure_spec`. Cost: about 14 s per row on 2 cores at the default preset."""
    rows, curves, per_model = [], {}, {}
    for spec in specs:
        run = runs[spec.run_id]
        ra = study.run_analysis(run, spec.test_domain)
        tag = f"{spec.run_id} on {spec.test_domain}"
        got = {}
        for stage, name, fn in plan_stages(ra, spec.test_domain, with_umap=spec == figure_spec):
            with progress.stage(f"{stage} {tag}") as h:
                got[name], h.reused = fn()
        accuracy, curve = _final_metrics(metrics[spec.run_id], spec.test_domain)
        measures = row_measures(study.dataset.domains, spec.test_domain, got["cka"], got["circuits"]["node"],
                                got["circuits"]["edge"], got["sharing"], got["emb"]["separation"])
        rows.append({"setup": spec.name, "seed": spec.seed, "test_domain": spec.test_domain, **accuracy, **measures,
                     "run_id": spec.run_id, "model_id": spec.run_id, "mixture_id": run["mixture_id"],
                     "n_train": run["n_train"], **got["controls"]})
        curves.setdefault(spec.test_domain, {}).setdefault(spec.name, []).append(curve)
        per_model[(spec.run_id, spec.test_domain)] = {k: got[k] for k in ("cka", "circuits", "sharing", "emb")}
    return rows, curves, per_model


def run_quickstart(opts: QuickstartOptions) -> dict[str, Any]:
    """Run (or resume) the whole study; writes DIR/results.json, DIR/report.md, DIR/figures/*.png.

    Returns the results dict. Raises RuntimeError naming the stage whose library piece is missing.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    study = open_study(opts)
    specs = model_specs(opts, study.test_domains)
    progress = Progress(plan_budgets(opts, specs, study.dataset), enabled=opts.progress)
    runs, metrics = train_and_evaluate(study, specs, progress)
    check_distinct_mixtures(specs, runs)
    figure_spec = next((s for s in specs if s.setup == "cg_high"), specs[0])
    rows, curves, per_model = analyse_models(study, specs, runs, metrics, progress, figure_spec)

    with progress.stage("figures and report"):
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k != "progress"}
        results = build_results(rows, config=config | {"test_domains": study.test_domains, "c2_classes": study.c2,
                                                       "c2_drawings_per_cell": drawings_per_cell(study)},
                                extra={"wall_time_s": None}, provenance=provenance(study.dataset, "cpu"))
        fig_dir = study.out / "figures"
        draw_figures(results, curves, per_model[(figure_spec.run_id, figure_spec.test_domain)], figure_spec,
                     study.dataset.domains, fig_dir)
        draw_controls_figures(results["models"], fig_dir)  # issue 13
        node_notes = node_figures(study.run_analysis(runs[figure_spec.run_id], figure_spec.test_domain),
                                  figure_spec.test_domain, fig_dir, study.out,
                                  model_id=figure_spec.run_id)  # issue 29
        results["extra"]["wall_time_s"] = round(time.perf_counter() - t0, 1)
    results["extra"]["stages"] = progress.timings()
    results["extra"]["cpu_time_s"] = round(time.process_time() - c0, 1)
    results["extra"]["controls_s"] = {k: round(v, 1) for k, v in progress.done.items() if k.startswith("controls ")}
    write_outputs(results, study.out,
                  {f"figures/{k}": v for k, v in (FIGURE_NOTES | CONTROLS_FIGURES).items()} | node_notes)
    return results


def draw_figures(results: dict[str, Any], curves: dict[str, dict[str, list[list[float]]]],
                 fig_model: dict[str, Any], fig_spec: ModelSpec, domains: Sequence[str], fig_dir: Path) -> None:
    """Draw the quickstart's figures into `fig_dir` from stored results (no model needed)."""
    models = results["models"]
    acc: dict[str, dict[str, list[float]]] = {}
    for m in models:
        acc.setdefault(m["setup"], {}).setdefault(m["test_domain"], []).append(m["c2_test_acc"])
    ci = {}
    for d in {m["test_domain"] for m in models}:
        for setup, e in setup_summary([m for m in models if m["test_domain"] == d]).items():
            if e["c2_test_acc"]["ci_low"] is not None:
                ci.setdefault(setup, {})[d] = (e["c2_test_acc"]["ci_low"], e["c2_test_acc"]["ci_high"])
    F.grouped_bars(acc, fig_dir / "fig2_c2_accuracy.png", ci=ci)
    F.accuracy_over_epochs(curves[fig_spec.test_domain], fig_dir / "accuracy_over_epochs.png",
                           title=f"C2 accuracy on {fig_spec.test_domain} during training",
                           epochs=curve_epochs(results["config"]["epochs"], results["config"]["curve_points"]))
    cka_res = fig_model["cka"]
    if cka_pairs(cka_res):  # else every pair had too few C2 rows: the report says so
        F.cka_per_layer(cka_pairs(cka_res), cka_res["points"], fig_spec.test_domain, fig_dir / "cka_per_layer.png",
                        title=f"Domain CKA per layer, {fig_spec.run_id} (C2 class centroids)")
    circ = fig_model["circuits"]
    F.jaccard_heatmaps(np.array(circ["node"], dtype=float), np.array(circ["edge"], dtype=float), domains,
                       fig_dir / "circuit_jaccard.png", title=f"Circuit overlap between domains, {fig_spec.run_id}")
    emb = fig_model["emb"]
    F.umap_by_domain(np.array(emb["umap"]), emb["domain_idx"], domains, fig_dir / "umap_by_domain.png",
                     title=f"Test embeddings of {fig_spec.run_id} (UMAP)")
    share = np.array([[np.nan if v is None else v for v in row] for row in fig_model["sharing"]["matrix"]])
    F.feature_sharing_matrix(share, domains, fig_dir / "feature_sharing.png",
                             title=f"SAE feature sharing on C2 classes, {fig_spec.run_id}")
    points = {k: [(m[k], m["c2_test_acc"], m["setup"]) for m in models if m[k] is not None]
              for k in SHAREDNESS_MEASURES}
    F.sharedness_scatter(points, results["correlations"], fig_dir / "sharedness_vs_c2.png")


def full_test_domains(dataset: str) -> tuple[str, ...]:
    """Every domain of `dataset` except the natural one (the `--full` test domains)."""
    ds = load_dataset(dataset, **({"views": 1} if dataset == "emoji" else {}))
    return tuple(d for d in ds.domains if d != ds.natural_domain)
