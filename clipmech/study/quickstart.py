"""`clipmech quickstart`: the paper's whole study, end to end, on the embedded emoji domains.

For each test domain and seed it trains the four main setups (natural-only, leave-out-domain,
CG low-diversity, CG high-diversity) with a tiny open_clip model (`clipmech.train`), evaluates
DG/CG zero-shot accuracy (`clipmech.eval`), and per model runs domain CKA per analysis point
(`clipmech.analysis.cka`), per-class circuits with node and edge similarity
(`clipmech.analysis.circuits`), SAE feature sharing (`clipmech.analysis.sae` / `.sharing`) and
embedding separation (`clipmech.analysis.embeddings`). It then relates every sharedness measure to
C2 accuracy across all models and writes figures, `results.json` and `report.md`.

This module only composes library functions; every primitive lives in its own package. Each stage
is stored in a `Registry` keyed by its inputs (config, checkpoint hash, dataset hash), so a rerun
skips finished work and a changed option recomputes only what depends on it.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipmech.analysis.activations import pool
from clipmech.analysis.circuit_similarity import edge_jaccard, node_jaccard
from clipmech.analysis.cka import domain_cka
from clipmech.analysis.embeddings import separation_scores, umap_2d
from clipmech.analysis.patching import cache_points
from clipmech.analysis.sae import evaluate_sae
from clipmech.analysis.sharing import feature_sharing, top_latent_histograms
from clipmech.data import load_dataset
from clipmech.data.mixtures import build_mixture
from clipmech.data.samples import distinct_drawings
from clipmech.eval.templates import get_templates
from clipmech.eval.zeroshot import (class_prompts_names, embed_images, eval_images, eval_transform_description,
                                    group_metrics)
from clipmech.models.hooked_clip import HookedCLIP
from clipmech.study import figures as F
from clipmech.study.circuit_sets import cell_circuits, circuit_cells
from clipmech.study.controls import FIGURE_NOTES as CONTROLS_FIGURES
from clipmech.study.controls import controls_budget, controls_model, draw_controls_figures
from clipmech.study.explanations import PER_FIGURE, ImageSet, explain_nodes, select_circuit_nodes
from clipmech.study.progress import Progress
from clipmech.study.registry import Registry
from clipmech.study.saes import study_sae
from clipmech.study.report import MAIN_SETUPS, SHAREDNESS_MEASURES, build_results, cka_mid, setup_summary, write_outputs
from clipmech.train.trainer import train
from clipmech.utils import TensorCache, file_hash, hash_obj, unknown_name_error

# Bump when a stage's computation changes so stored results are not reused across versions.
STAGE_VERSION = 3  # 3: sparse, standardised SAEs (issue 13)

# The quickstart's default test domains. Not the emoji dataset's default (quickdraw, the domain with
# the largest DG gap): on quickdraw a 10-minute tiny CLIP gets 0-1 of the 15 held-out-class images
# right in every setup (measured: C2 0.0-6.7 %, C1 1-20 %), so nothing can be compared. On clipart
# and painting the same budget gives C2 accuracies of 7-60 % that differ between setups.
QUICKSTART_TEST_DOMAINS = {"emoji": ("clipart", "painting")}


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
    test_domains: tuple[str, ...] | None = None  # None: QUICKSTART_TEST_DOMAINS, else the dataset's default
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
    circuit_classes: int = 5  # C2 classes with a circuit per domain (paper: all 15)
    sae_expansion: int = 4  # latents = expansion x embedding width (paper: 4)
    sae_epochs: int = 100  # at batch 256, lr 3e-3 (clipmech.study.saes: what converges in the budget)
    cka_boot: int = 50
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

    def analysis_key(self) -> dict[str, Any]:
        """The options analyses depend on (training options enter through the checkpoint hash)."""
        return {"circuit_steps": self.circuit_steps, "circuit_classes": self.circuit_classes,
                "sae_expansion": self.sae_expansion, "sae_epochs": self.sae_epochs, "cka_boot": self.cka_boot,
                "n_templates": self.n_templates, "version": STAGE_VERSION}


# Types and ranges of the scalar options (clipmech.train.config.SCHEMA notation).
_OPTION_TYPES = {"out": ("str", None), "dataset": ("str", None), "views": ("int", ">=1"), "seeds": ("int", ">=1"),
                 "model": ("str", None), "image_size": ("int", ">=1"), "epochs": ("int", ">=1"),
                 "batch_size": ("int", ">=1"), "lr": ("float", ">0"), "curve_points": ("int", ">=1"),
                 "n_templates": ("int", ">=1"), "max_classes": ("int?", ">=1"), "circuit_steps": ("int", ">=1"),
                 "circuit_classes": ("int", ">=1"), "sae_expansion": ("int", ">=1"), "sae_epochs": ("int", ">=1"),
                 "cka_boot": ("int", ">=0"), "n_c2": ("int", ">=1"), "c2_both_splits": ("bool", None),
                 "train_workers": ("int", ">=1"), "progress": ("bool", None)}



@dataclass
class ModelSpec:
    """One trained model: natural-only is trained once per seed and evaluated on every test domain."""

    setup: str
    seed: int
    test_domain: str

    @property
    def run_id(self) -> str:
        if self.setup == "natural_only":
            return f"natural_only-s{self.seed}"
        return f"{self.setup}-{self.test_domain}-s{self.seed}"


@dataclass
class Study:
    """State shared by the stages of one quickstart run."""

    opts: QuickstartOptions
    dataset: Any = None
    test_domains: list[str] = field(default_factory=list)
    c2: list[str] = field(default_factory=list)
    registry: Registry | None = None
    _images: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    def images(self, split: str) -> torch.Tensor:
        """Preprocessed images of a split, float32 [N, 3, S, S] in `dataset.indices(split)` order.

        clipmech.eval.zeroshot.eval_images is computed once per (dataset, split, size) and kept on
        disk (TensorCache) and in memory: every stage and model reuses the same tensor.
        """
        if split not in self._images:
            idx = self.dataset.indices(split=split)
            self._images[split] = self._image_cache().get_or_compute(
                self._image_key(split), lambda: eval_images(self.dataset, idx, self.opts.image_size))
        return self._images[split]

    def images_cached(self, split: str) -> bool:
        """Whether `images(split)` will be read from the on-disk cache."""
        return split in self._images or self._image_cache().path(self._image_key(split)).exists()

    def _image_cache(self):
        return TensorCache(self.out / "cache")

    def _image_key(self, split: str) -> dict[str, Any]:
        return {"dataset": self.dataset.content_hash(), "split": split,
                "n": int(len(self.dataset.indices(split=split))), "transform": eval_transform_description(self.opts.image_size)}

    def templates(self) -> list[str]:
        """The zero-shot templates: the first `n_templates` of the dataset's template set."""
        return get_templates("auto", self.dataset.name)[: self.opts.n_templates]


def resolve_dataset(opts: QuickstartOptions) -> tuple[Any, list[str], list[str]]:
    """(dataset, test domains, C2 class names); applies `max_classes` by keeping C2 first."""
    ds = load_dataset(opts.dataset, **({"views": opts.views} if opts.dataset == "emoji" else {}))
    c2 = extend_c2(list(ds.default_test_classes or []), ds.classes, opts.n_c2)
    if not c2:
        raise ValueError(f"dataset {opts.dataset!r} defines no default C2 classes; the quickstart needs them")
    domains = list(opts.test_domains or QUICKSTART_TEST_DOMAINS.get(opts.dataset, [ds.default_test_domain]))
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
        budgets[f"SAE {tag}"] = 2.0 + 0.02 * opts.sae_epochs
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
        "mixture": {"setup": spec.setup, "test_domain": _mixture_test_domain(spec), "test_classes": list(c2)},
        "optim": {"lr": opts.lr},
        "schedule": {"warmup": 50},
        "train": {"epochs": opts.epochs, "batch_size": opts.batch_size, "seed": spec.seed, "out": str(run_dir),
                  "tensorboard": False, "progress": False,
                  # only the checkpoints the accuracy curve reads (each tiny-rn checkpoint is ~18 MB)
                  "save_epochs": curve_epochs(opts.epochs, opts.curve_points)},
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
                            split="train", seed=42)
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
    epochs = curve_epochs(study.opts.epochs, study.opts.curve_points)
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


def drawings_per_cell(study: Study) -> str:
    """Distinct C2 drawings per (test domain, class) that the C2 accuracy averages, e.g. "2" or "1-3"."""
    ds = study.dataset
    test = ds.indices(split="test")
    counts = []
    for d in study.test_domains:
        extra = unseen_c2_rows(study, ModelSpec("lod", 0, d)) if study.opts.c2_both_splits else np.zeros(0, int)
        classes = np.concatenate([ds.class_idx[test][ds.domain_idx[test] == ds.domain_index(d)],
                                  ds.class_idx[ds.indices(split="train")[extra]]])
        counts += [int((classes == k).sum()) for k in _c2_idx(study)]
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def load_model(run: dict[str, Any]):
    """The HookedCLIP of a run's final checkpoint (CPU, eval mode)."""
    return HookedCLIP.from_checkpoint(run["checkpoint"]).eval()


def _test_split(study: Study) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, class_idx, domain_idx) of the test split (every domain, every class)."""
    idx = study.dataset.indices(split="test")
    return idx, study.dataset.class_idx[idx], study.dataset.domain_idx[idx]


def _c2_idx(study: Study) -> list[int]:
    return [study.dataset.classes.index(c) for c in study.c2]


def _points(model) -> list[str]:
    """Analysis points for CKA and node similarity: all but the input (paper §8.1)."""
    return [p for p in model.analysis_points() if p != "visual.hook_input"]


def pooled_activations(model, images: torch.Tensor, points: Sequence[str], batch_size: int = 512
                       ) -> dict[str, torch.Tensor]:
    """{point: [N, C]} mean-pooled activations (clipmech.analysis.activations.pool: spatial mean of
    conv maps, token mean of sequences) of already preprocessed `images`.

    clipmech.analysis.activations.extract_activations would re-load and re-preprocess the images
    for every model; the study preprocesses them once (`Study.images`) and feeds the tensor through
    clipmech.analysis.patching.cache_points instead.
    """
    chunks: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    for i in range(0, len(images), batch_size):
        for p, act in cache_points(model, images[i:i + batch_size], points).items():
            chunks[p].append(pool(act, "mean"))
    return {p: torch.cat(v) for p, v in chunks.items()}


def cka_model(study: Study, run: dict[str, Any], model) -> tuple[dict[str, Any], bool]:
    """Linear, unbiased, class-centroid CKA between every domain pair at every analysis point.

    Rows = C2 class centroids of spatially mean-pooled test-split activations (paper §8.3).
    Returns clipmech.analysis.cka.domain_cka's JSON-able dict.
    """
    key = {"stage": "cka", "checkpoint": run["checkpoint_hash"], "dataset": study.dataset.content_hash(),
           "c2": study.c2, **study.opts.analysis_key()}

    def compute() -> dict:
        idx, cls, dom = _test_split(study)
        feats = pooled_activations(model, study.images("test"), _points(model))
        return domain_cka(feats, cls, dom, study.dataset.domains, {"C2": _c2_idx(study)}, mode="centroid",
                          kernels=("linear",), n_boot=study.opts.cka_boot, n_perm=0)

    return study.registry.run("cka", key, compute)


def cka_pairs(cka_result: dict[str, Any], subset: str = "C2") -> dict[tuple[str, str], list[float]]:
    """{(a, b): linear CKA per point} from a domain_cka result; pairs with an undefined value are dropped."""
    out = {}
    for pair, res in cka_result["results"][subset]["linear"].items():
        if all(v is not None for v in res["cka"]):
            a, b = pair.split("|")
            out[(a, b)] = res["cka"]
    return out


def circuits_model(study: Study, run: dict[str, Any], model) -> tuple[dict[str, Any], bool]:
    """Per-(domain, class) circuits on up to 50 test images per cell (`circuit_sets.circuit_cells`)
    for the first `circuit_classes` C2 classes (stored once, reused by the controls); node Jaccard
    (mean over points except the input, paper §8.5) and edge Jaccard (§8.6) between domains,
    averaged over classes. Returns {"domains", "classes", "node": [D, D], "edge": [D, D]}."""
    ds = study.dataset
    test_cells, _ = circuit_cells(study)
    circuits, reused = cell_circuits(study, model, run["checkpoint_hash"], test_cells, "test")
    points = _points(model)
    D = len(ds.domains)
    node, edge = [[None] * D for _ in range(D)], [[None] * D for _ in range(D)]
    for a, da in enumerate(ds.domains):
        for b, db in enumerate(ds.domains):
            shared = [k for k in circuits[da] if k in circuits[db]]
            if shared:
                node[a][b] = float(np.mean([np.mean(list(node_jaccard(circuits[da][k], circuits[db][k],
                                                                      points).values())) for k in shared]))
                edge[a][b] = float(np.mean([edge_jaccard(circuits[da][k], circuits[db][k]) for k in shared]))
    classes = _c2_idx(study)[: study.opts.circuit_classes]
    return {"domains": ds.domains, "classes": [ds.classes[k] for k in classes], "node": node, "edge": edge}, reused


def node_figures(study: Study, run: dict[str, Any], model, test_domain: str, fig_dir: Path,
                 per_domain: int = 8) -> dict[str, str]:
    """The report's node figures (issue 29): the top PER_FIGURE shared and test-domain-only nodes of
    the model's C2 circuits on `test_domain` (the stored circuit set, `circuits_model`), labelled with
    the study's class names in its templates, explained on up to `per_domain` C2 test images per
    domain, top examples among 2 x `per_domain` test images per domain -> fig_dir/explain/
    (explanations.json, thumbs, nodes_<group>.png). Returns {figure path: note}; empty when no
    other domain has circuits. Cost: one segment forward per node over the sample and one forward
    over the pool."""
    ds = study.dataset
    test_cells, _ = circuit_cells(study)
    circuits, _ = cell_circuits(study, model, run["checkpoint_hash"], test_cells, "test")
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
        words = model.zero_shot_head(names, study.templates())
    present, labels = np.unique(cls[sample], return_inverse=True)
    images = study.images("test")
    pool_set = ImageSet(images[pool_rows], dom[pool_rows], sources=[ds.source_key(int(i)) for i in test[pool_rows]],
                        classes=[ds.classes[int(k)] for k in cls[pool_rows]])
    meta = {"test_domain": test_domain, "circuits": found, "model": run["checkpoint_hash"],
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
    return {str(p.relative_to(study.out)): notes.get(p.stem.removeprefix("nodes_"), "") for p in paths}


def _mean_vs_others(matrix: Sequence[Sequence[float | None]], domains: Sequence[str], d: str) -> float:
    """Mean of row `d` over the other domains (the paper's score(d*)); raises when undefined."""
    i = list(domains).index(d)
    vals = [matrix[i][j] for j in range(len(domains)) if j != i and matrix[i][j] is not None
            and math.isfinite(matrix[i][j])]
    if not vals:
        raise ValueError(f"no similarity between test domain {d!r} and any other domain was computed")
    return float(np.mean(vals))


def sae_sharing_model(study: Study, run: dict[str, Any], model) -> tuple[dict[str, Any], bool]:
    """SAE on the L2-normalised image embeddings of the train split (all domains), then the paper's
    Alg. 1-2 feature sharing over the C2 test images. Returns feature_sharing's dict + SAE metrics."""
    key = {"stage": "sae", "checkpoint": run["checkpoint_hash"], "dataset": study.dataset.content_hash(),
           "c2": study.c2, **study.opts.analysis_key()}

    def compute() -> dict:
        ds = study.dataset
        train_x = embed_images(model, study.images("train"))
        sae, info, _ = study_sae(study, run["checkpoint_hash"], train_x, seed=0)
        test = ds.indices(split="test")
        rows = np.flatnonzero(np.isin(ds.class_idx[test], _c2_idx(study)))
        with torch.no_grad():
            codes = sae.encode(embed_images(model, study.images("test")[rows]))
        H = top_latent_histograms(codes, ds.class_idx[test][rows], ds.domain_idx[test][rows], _c2_idx(study),
                                  len(ds.domains))
        out = feature_sharing(H, ds.domains, class_names=study.c2)
        out.pop("per_class")
        return out | {"sae": evaluate_sae(sae, train_x), "sae_last_epoch": info["last_epoch"]}

    return study.registry.run("sae", key, compute)


def embeddings_model(study: Study, run: dict[str, Any], model, with_umap: bool) -> tuple[dict[str, Any], bool]:
    """Domain separation of the normalised test embeddings (clipmech.analysis.embeddings.separation_scores:
    silhouette, cross-validated domain-probe accuracy), and 2-D UMAP coordinates if asked."""
    key = {"stage": "embeddings", "checkpoint": run["checkpoint_hash"], "dataset": study.dataset.content_hash(),
           "umap": with_umap, **study.opts.analysis_key()}

    def compute() -> dict:
        _, _, dom = _test_split(study)
        emb = embed_images(model, study.images("test")).numpy()
        out = {"separation": separation_scores(emb, dom, study.dataset.domains)["overall"]}
        if with_umap:
            out["umap"] = np.asarray(umap_2d(emb)).tolist()
            out["domain_idx"] = dom.tolist()
        return out

    return study.registry.run("embeddings", key, compute)


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


def run_quickstart(opts: QuickstartOptions) -> dict[str, Any]:
    """Run (or resume) the whole study; writes DIR/results.json, DIR/report.md, DIR/figures/*.png.

    Returns the results dict. Raises RuntimeError naming the stage whose library piece is missing.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    opts.validate()
    study = Study(opts, registry=Registry(Path(opts.out) / "registry"))
    study.dataset, study.test_domains, study.c2 = resolve_dataset(opts)
    specs = model_specs(opts, study.test_domains)
    progress = Progress(plan_budgets(opts, specs, study.dataset), enabled=opts.progress)
    with progress.stage("load data") as h:
        h.reused = study.images_cached("test") and study.images_cached("train")
        study.images("test"), study.images("train")

    runs: dict[str, dict[str, Any]] = {}
    metrics: dict[str, dict] = {}
    with progress.stage("train") as h:
        runs.update(train_models(study, specs))
        h.reused = all(r["reused"] for r in runs.values())
    for spec in dict((s.run_id, s) for s in specs).values():
        with progress.stage(f"evaluate {spec.run_id}") as h:
            metrics[spec.run_id], h.reused = evaluate_model(study, runs[spec.run_id], spec)

    check_distinct_mixtures(specs, runs)
    rows, curves, per_model = [], {}, {}
    figure_spec = next((s for s in specs if s.setup == "cg_high"), specs[0])
    for spec in specs:
        run = runs[spec.run_id]
        model = load_model(run)
        tag = f"{spec.run_id} on {spec.test_domain}"
        with progress.stage(f"CKA {tag}") as h:
            cka_res, h.reused = cka_model(study, run, model)
        with progress.stage(f"circuits {tag}") as h:
            circ, h.reused = circuits_model(study, run, model)
        with progress.stage(f"SAE {tag}") as h:
            share, h.reused = sae_sharing_model(study, run, model)
        with progress.stage(f"embeddings {tag}") as h:
            emb, h.reused = embeddings_model(study, run, model, with_umap=spec == figure_spec)
        with progress.stage(f"controls {tag}") as h:  # issue 13: floors, ceilings, causal test, faithfulness
            ctrl, h.reused = controls_model(study, run, model, spec.test_domain)
        accuracy, curve = _final_metrics(metrics[spec.run_id], spec.test_domain)
        domains = study.dataset.domains
        rows.append({"setup": spec.setup, "seed": spec.seed, "test_domain": spec.test_domain, **accuracy,
                     "cka_mid": cka_mid(cka_pairs(cka_res), spec.test_domain),
                     "node_jaccard": _mean_vs_others(circ["node"], domains, spec.test_domain),
                     "edge_jaccard": _mean_vs_others(circ["edge"], domains, spec.test_domain),
                     "feature_sharing": share["score"][spec.test_domain],
                     "embedding_separation": emb["separation"], "run_id": spec.run_id, "model_id": spec.run_id,
                     "mixture_id": run["mixture_id"], "n_train": run["n_train"], **ctrl})
        curves.setdefault(spec.test_domain, {}).setdefault(spec.setup, []).append(curve)
        per_model[(spec.run_id, spec.test_domain)] = {"cka": cka_res, "circuits": circ, "sharing": share, "emb": emb}

    with progress.stage("figures and report"):
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k != "progress"}
        results = build_results(rows, config=config | {"test_domains": study.test_domains, "c2_classes": study.c2,
                                                       "c2_drawings_per_cell": drawings_per_cell(study)},
                                extra={"wall_time_s": None})
        fig_dir = study.out / "figures"
        draw_figures(results, curves, per_model[(figure_spec.run_id, figure_spec.test_domain)], figure_spec,
                     study.dataset.domains, fig_dir)
        draw_controls_figures(results["models"], fig_dir)  # issue 13
        node_notes = node_figures(study, runs[figure_spec.run_id], load_model(runs[figure_spec.run_id]),
                                  figure_spec.test_domain, fig_dir)  # issue 29
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
    points = {k: [(m[k], m["c2_test_acc"], m["setup"]) for m in models] for k in SHAREDNESS_MEASURES}
    F.sharedness_scatter(points, results["correlations"], fig_dir / "sharedness_vs_c2.png")


def full_test_domains(dataset: str) -> tuple[str, ...]:
    """Every domain of `dataset` except the natural one (the `--full` test domains)."""
    ds = load_dataset(dataset, **({"views": 1} if dataset == "emoji" else {}))
    return tuple(d for d in ds.domains if d != ds.natural_domain)
