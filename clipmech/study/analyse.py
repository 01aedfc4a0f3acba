"""The mechanistic analysis of one trained run, at any scale, from the run's own configuration.

`RunContext(run_dir, options)` is the run's Source (clipmech.analysis.source.source_from_run, which
reads RUN_DIR/config.toml) with the options: the model and image size come from the
checkpoint and config, the dataset (and so its classes), the C2 classes ([mixture] test_classes or
the dataset's default) and the templates ([eval] templates) from the config; nothing falls back to
the quickstart's defaults. `AnalysisOptions` (an experiment file's [analysis] table) only sets how
much to analyse.

The analysis is split into idempotent units (clipmech.launch), each a module-level function of
(run_dir, options, ...):

    extract      test split: pooled activations at every analysis point + normalised image
                 embedding; train split: the embedding. Streamed to content-hashed shards.
    circuits     one class (C2, or every class with circuit_scope "all"): its circuit in every domain
                 on `cell_samples` images, node / edge Jaccard and WL "h2" between domains
    cka          class-centroid linear CKA between every domain pair, per point, for all / C2 / C1
                 classes (streamed centroids)
    sae          SAE on the train embeddings (streamed), feature sharing on the C2 test images
    embeddings   domain separation (and UMAP) of a per-domain sample of test embeddings
    controls     the per-run plan's controls stage (clipmech.study.plan / .controls), the same the
                 quickstart runs: floors, ceilings, normalised scores, the untrained model,
                 faithfulness, the causal test

`model_rows` turns the finished units and the run's zero-shot evaluation into the study's model rows
(clipmech.study.report schema), one per test domain the run serves; their sharedness measures are
C2 means, and the all / C2 / C1 circuit matrices go to results.json `extra.circuits`.

`paper_compat` ([analysis] paper_compat, `--paper-compat`, or the run config's own [analysis]
paper_compat) reproduces the paper code's quirks (clipmech.analysis.paper_compat) in the units: CKA's
"all" / C1 rows from painting's class list, WL "h2" running 3 iterations, the wrap-around edges.
The allow-p quota quirk belongs to training: the run config's flag built its mixture, and each row
records it as `mixture_paper_compat`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from clipmech.analysis.cka import MIN_ROWS
from clipmech.analysis.discovery import CIRCUIT_METHODS
from clipmech.checks import check_device, check_keys, check_typed
from clipmech.errors import ConfigError
from clipmech.launch import LaunchOptions, Unit, run_units
from clipmech.utils import hash_obj, read_json

EMBED_POINT = "hook_image_embed_normalized"
ANALYSIS_VERSION = 2  # 2: circuits on cell_samples images with WL, CKA for all / C2 / C1
CIRCUIT_SCOPES = ("c2", "all")
CIRCUIT_SEED = 42  # the paper's one shuffle of the test split (docs/methods.md#circuits)
EAP_REFERENCE_CLASSES = 64  # eap_ig circuits: mean ablation over one test image of each of this many classes
MIN_ROWS_UNBIASED = 4  # the unbiased CKA estimator is undefined on fewer rows (clipmech.analysis.cka)


@dataclass(frozen=True)
class AnalysisOptions:
    """How much of each run to analyse (an experiment's [analysis] table); what is analysed (model,
    image size, classes, C2, templates) always comes from the run. Paper values noted."""

    points: tuple[str, ...] | None = None  # analysis points; None: the model's, except the input
    classes: tuple[str, ...] | None = None  # restrict the run's classes (must keep C2); None: all
    images_per_cell: int | None = None  # test/train images per (domain, class); None: all
    circuit_images: int = 50  # images per (domain, class) circuit (paper: 50)
    circuit_steps: int = 10  # IG Riemann steps (paper: 10)
    circuit_scope: str = "c2"  # classes with circuits: "c2" | "all" (every class, C2 first; the paper's)
    circuit_classes: int | None = None  # first classes of the scope with circuits; None: all of them
    circuit_method: str = "paper_ig"  # or "eap_ig" (clipmech.study.plan.Preset.circuit_method)
    sae_expansion: int = 4  # latents = expansion x embedding width (paper: 4)
    # SAE budget in Adam steps (epochs do not carry from thousands of vectors to millions): the paper's
    # 200 epochs at batch 2048 and lr 1e-4 (docs/methods.md#sae) over DomainNet's ~410k training
    # embeddings; on CC12M's 9.36M vectors the paper's run is ~914k steps. Toy-scale experiment files
    # set their own (the paper-scale test's ~1k vectors: 600 steps at batch 256, lr 3e-3). The controls'
    # two SAEs (seeds 0 and 1, feature sharing's seed ceiling) use the same three settings.
    sae_steps: int = 40_000
    sae_batch_size: int = 2048
    sae_lr: float = 1e-4
    cka_boot: int = 200
    cka_min_rows: int = MIN_ROWS  # domain pairs with fewer C2 centroid rows are skipped
    n_templates: int | None = None  # first templates of the run's set for the circuit head; None: all
    embedding_images: int = 2000  # test embeddings per domain for separation and UMAP (paper: 2000)
    batch_size: int = 128
    workers: int = 0  # DataLoader workers decoding images
    shard_rows: int = 4096
    precision: str = "fp32"  # extraction: fp32 | bf16 | fp16; attributions are always fp32
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    paper_compat: bool = False  # the paper code's quirks (see the module docstring); OR'd with the run's
    controls: bool = True
    # The controls unit keeps both splits' preprocessed images in memory (clipmech.study.plan.ImageStore)
    # when they fit in this many GB (~100k images at 64 px: 4.9 GB), else decodes the rows each step asks
    # for (SplitImages; all of DomainNet at 224 px would be ~350 GB). Results are the same either way.
    image_memory_gb: float = 16.0
    # Images per domain in a mean-ablation reference (faithfulness, the causal test, EAP-IG): a seeded
    # sample (data.samples.capped_rows), so a 50k-image domain is not decoded whole for one mean;
    # None: all of the domain's test images, as the quickstart (its domains have a few hundred).
    reference_images: int | None = 2000

    def preset(self):
        """The per-run plan's Preset (clipmech.study.plan) for the stages both paths share (the controls)."""
        from clipmech.study.plan import Preset
        return Preset(circuit_steps=self.circuit_steps, circuit_classes=self.circuit_classes,
                      sae_expansion=self.sae_expansion, sae_steps=self.sae_steps,
                      sae_batch_size=self.sae_batch_size, sae_lr=self.sae_lr, cka_boot=self.cka_boot,
                      n_templates=self.n_templates, cka_min_rows=self.cka_min_rows,
                      circuit_method=self.circuit_method, reference_images=self.reference_images)

    def key(self) -> dict[str, Any]:
        """The options results depend on (not batch size, workers, shard size or device; the circuit
        method only when it is not the paper's, so finished paper-IG units keep their keys)."""
        skip = {"batch_size", "workers", "shard_rows", "device", "controls", "image_memory_gb"}
        if self.circuit_method == "paper_ig":
            skip.add("circuit_method")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip} | {"v": ANALYSIS_VERSION}


# Type and range of every option, checked before the first unit starts (clipmech.checks notation).
OPTION_TYPES = {"points": ("list[str]?", None), "classes": ("list[str]?", None), "images_per_cell": ("int?", ">=1"),
                "circuit_images": ("int", ">=1"), "circuit_steps": ("int", ">=1"), "circuit_scope": ("str", CIRCUIT_SCOPES),
                "circuit_method": ("str", CIRCUIT_METHODS),
                "circuit_classes": ("int?", ">=1"), "sae_expansion": ("int", ">=1"), "sae_steps": ("int", ">=1"),
                "sae_batch_size": ("int", ">=1"), "sae_lr": ("float", ">0"), "cka_boot": ("int", ">=0"), "cka_min_rows": ("int", f">={MIN_ROWS_UNBIASED}"),
                "n_templates": ("int?", ">=1"), "embedding_images": ("int", ">=1"), "batch_size": ("int", ">=1"),
                "workers": ("int", ">=0"), "shard_rows": ("int", ">=1"), "precision": ("str", ("fp32", "bf16", "fp16")),
                "device": ("str", None), "paper_compat": ("bool", None), "controls": ("bool", None),
                "image_memory_gb": ("float", ">0"), "reference_images": ("int?", ">=1")}


def analysis_options(table: Mapping[str, Any], **overrides: Any) -> AnalysisOptions:
    """AnalysisOptions from an [analysis] table (without `source`) and overrides (None = unset).

    Every key and value is checked here, before any unit runs: an unknown key names the closest
    valid one, a value of the wrong type or range names the key and its range (ConfigError, exit 2)."""
    if "sae_epochs" in table:
        raise ConfigError("[analysis] sae_epochs was replaced by sae_steps, the SAE budget in Adam steps (epochs do "
                          "not carry from thousands of vectors to millions): sae_steps = epochs x ceil(N / "
                          "sae_batch_size) for N training embeddings")
    check_keys("[analysis]", table, [*OPTION_TYPES, "source"])
    given = {k: v for k, v in table.items() if k != "source"} | {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        kind, rule = OPTION_TYPES[key]
        check_typed(f"[analysis] {key}", list(value) if isinstance(value, tuple) else value, kind, rule)
    check_device("[analysis] device", given.get("device", "auto"), here=False)
    return AnalysisOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def check_device_here(opts: AnalysisOptions) -> None:
    """ConfigError when the options ask for a CUDA device this machine does not have (for units run
    here; a SLURM job's node is not this machine)."""
    check_device("[analysis] device", opts.device)


class RunContext:
    """A trained run as the analysis units see it: its Source (clipmech.analysis.source: config,
    final checkpoint, dataset, C2, templates) and the AnalysisOptions that say how much to analyse."""

    def __init__(self, run_dir: str | Path, opts: AnalysisOptions):
        from clipmech.analysis.source import source_from_run
        self.run_dir, self.opts = Path(run_dir), opts
        source = source_from_run(self.run_dir, finished=True, verify="none")
        if opts.classes is not None:
            source = source.with_classes(opts.classes)
        self.source = replace(source, templates=source.templates[: opts.n_templates])
        self.cfg, self.checkpoint = source.config, source.checkpoint

    @property
    def paper_compat(self) -> bool:
        """The paper code's quirks in this run's analysis: [analysis] paper_compat of the options or
        of the run's own config (as `clipmech analyze` does)."""
        return bool(self.opts.paper_compat or self.source.paper_compat)

    @cached_property
    def checkpoint_hash(self) -> str:
        return self.source.model_key.removeprefix("file:")

    @cached_property
    def device(self) -> str:
        if self.opts.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.opts.device

    def points(self) -> list[str]:
        """Analysis points for CKA and node similarity: [analysis] points, else all but the input
        (docs/methods.md#analysis-points)."""
        if self.opts.points:
            return list(self.opts.points)
        from clipmech.analysis.activations import inner_points
        return inner_points(self.source.model.analysis_points())

    def rows(self, split: str) -> np.ndarray:
        """Dataset rows of `split`, at most images_per_cell per (domain, class), in dataset order."""
        idx = self.source.dataset.indices(split=split)
        return _cap_per_cell(idx, self.source.dataset, self.opts.images_per_cell)

    def shards(self, split: str, root: str | Path):
        """The split's activation shards (written once; later calls reuse the folder)."""
        from clipmech.analysis.activations import write_shards
        points = self.points() + [EMBED_POINT] if split == "test" else [EMBED_POINT]
        return write_shards(self.source.model, self.source.dataset, self.rows(split), points, root,
                            self.checkpoint_hash, batch_size=self.opts.batch_size, num_workers=self.opts.workers, device=self.device,
                            precision=self.opts.precision, shard_rows=self.opts.shard_rows)

    def unit_key(self, unit: str) -> dict[str, Any]:
        """Everything a unit's result depends on (its output folder is named by this key's hash)."""
        return {"unit": unit, "checkpoint": self.checkpoint_hash, "dataset": self.source.dataset.content_hash(),
                "c2": self.source.c2, "templates": self.source.templates,
                "options": unit_options(unit, self.opts.key()), "paper_compat": self.paper_compat}


# The options every unit reads through RunContext (its rows, points, templates and shards), and those
# each unit reads besides: a unit's key holds only these, so a changed SAE setting reruns the sae and
# controls units, not the extraction or the circuits. A unit not listed (controls) keys on all options.
_SHARED_OPTIONS = ("points", "classes", "images_per_cell", "n_templates", "precision", "v")
_UNIT_OPTIONS = {"extract": (), "cka": ("cka_boot", "cka_min_rows"), "embeddings": ("embedding_images",),
                 "sae": ("sae_expansion", "sae_steps", "sae_batch_size", "sae_lr"),
                 "circuits": ("circuit_images", "circuit_steps", "circuit_method")}


def unit_options(unit: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `options` (AnalysisOptions.key()) that unit `unit` ("circuits/<class>" counts as
    "circuits") depends on."""
    own = _UNIT_OPTIONS.get(unit.split("/")[0])
    if own is None:
        return dict(options)
    return {k: v for k, v in options.items() if k in _SHARED_OPTIONS or k in own}


def _cap_per_cell(idx: np.ndarray, ds, cap: int | None) -> np.ndarray:
    if cap is None:
        return idx
    cell = ds.domain_idx[idx].astype(np.int64) * len(ds.classes) + ds.class_idx[idx]
    order = np.argsort(cell, kind="stable")
    rank = np.empty(len(idx), np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(cell[order])) + 1]
    rank[order] = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
    return idx[rank < cap]


# ------------------------------------------------------------------------------------ units
def unit_extract(run_dir: str, opts: AnalysisOptions, shard_root: str) -> dict[str, Any]:
    """Write the run's test and train activation shards; returns their folders and sizes."""
    ctx = RunContext(run_dir, opts)
    test, train = ctx.shards("test", shard_root), ctx.shards("train", shard_root)
    return {"test": str(test.folder), "train": str(train.folder), "n_test": len(test), "n_train": len(train),
            "points": test.points, "image_size": ctx.source.image_size, "device": ctx.device}


def unit_cka(run_dir: str, opts: AnalysisOptions, shard_root: str) -> dict[str, Any]:
    """Linear, unbiased, class-centroid CKA between every domain pair per point, for the all / C2 / C1
    classes (docs/methods.md#cka; the rows use C2), from streamed centroids of the test shards. paper_compat:
    all / C1 rows from painting's class list. Returns domain_cka's dict + "paper_compat"."""
    from clipmech.analysis.activations import cell_means
    from clipmech.analysis.cka import domain_cka
    from clipmech.analysis.paper_compat import cka_class_list_domain
    ctx = RunContext(run_dir, opts)
    ds, points = ctx.source.dataset, ctx.points()
    means, cells = cell_means(ctx.shards("test", shard_root), points, ds.class_idx, ds.domain_idx,
                              len(ds.domains), len(ds.classes))
    subsets = {"all": list(range(len(ds.classes))), "C2": ctx.source.c2_idx,
               "C1": [k for k in range(len(ds.classes)) if k not in ctx.source.c2_idx]}
    out = domain_cka(means, cells[:, 1], cells[:, 0], ds.domains, subsets, mode="centroid", kernels=("linear",),
                     n_boot=opts.cka_boot, n_perm=0, min_rows=opts.cka_min_rows,
                     class_list_domain=cka_class_list_domain(ds.domains, ctx.paper_compat))
    return out | {"paper_compat": ctx.paper_compat}


def unit_sae(run_dir: str, opts: AnalysisOptions, shard_root: str) -> dict[str, Any]:
    """SAE on the train embeddings (streamed from shards), then Alg. 1-2 feature sharing over the C2
    test images, histograms accumulated batch by batch. Returns feature_sharing's dict + SAE metrics."""
    from clipmech.analysis.sae import evaluate_sae, train_sae
    from clipmech.analysis.sharing import feature_sharing, top_latent_histograms
    ctx = RunContext(run_dir, opts)
    ds, c2 = ctx.source.dataset, np.asarray(ctx.source.c2_idx)
    train = ctx.shards("train", shard_root).shards(EMBED_POINT)
    sae, history = train_sae(train, n_latents=opts.sae_expansion * train.dim, steps=opts.sae_steps,
                             batch_size=opts.sae_batch_size, lr=opts.sae_lr, seed=0, device=ctx.device)
    H = None
    with torch.no_grad():
        for rows, xs in ctx.shards("test", shard_root).iter_batches([EMBED_POINT]):
            keep = np.isin(ds.class_idx[rows], c2)
            if keep.any():
                r = rows[keep]
                h = top_latent_histograms(sae.encode(xs[EMBED_POINT][torch.from_numpy(keep)]), ds.class_idx[r],
                                          ds.domain_idx[r], ctx.source.c2_idx, len(ds.domains))
                H = h if H is None else H + h
    if H is None:
        raise ValueError(f"{run_dir}: the test split holds no image of the C2 classes {ctx.source.c2}")
    out = feature_sharing(H, ds.domains, class_names=ctx.source.c2)
    out.pop("per_class")
    return out | {"sae": evaluate_sae(sae, train), "sae_last_epoch": history[-1]}


def unit_embeddings(run_dir: str, opts: AnalysisOptions, shard_root: str, with_umap: bool) -> dict[str, Any]:
    """Domain separation (silhouette, domain-probe accuracy) of up to `embedding_images` test
    embeddings per domain (seeded sample), and their 2-D UMAP when asked."""
    from clipmech.analysis.embeddings import separation_scores, subsample_per_domain, umap_2d
    ctx = RunContext(run_dir, opts)
    shards = ctx.shards("test", shard_root)
    dom_all = ctx.source.dataset.domain_idx[shards.indices]
    pick = set(subsample_per_domain(dom_all, opts.embedding_images).tolist())
    parts, start = [], 0
    for rows, xs in shards.iter_batches([EMBED_POINT]):
        sel = [j for j in range(len(rows)) if start + j in pick]
        parts.append(xs[EMBED_POINT][sel])
        start += len(rows)
    emb = torch.cat(parts).numpy()
    dom = dom_all[sorted(pick)]
    out = {"separation": separation_scores(emb, dom, ctx.source.dataset.domains)["overall"], "n": int(len(emb))}
    if with_umap:
        out["umap"] = np.asarray(umap_2d(emb)).tolist()
        out["domain_idx"] = dom.tolist()
    return out


CIRCUIT_MEASURES = ("node", "edge", "wl_h2")


def circuit_pair_matrices(circuits: Mapping[str, Any], domains: Sequence[str], points: Sequence[str],
                          paper_compat: bool) -> dict[str, list[list[float | None]]]:
    """{"node": mean node Jaccard over `points`, "edge": edge Jaccard, "wl_h2": WL score "h2" (paper_compat:
    3 iterations)} as [D, D] lists, None where a domain has no circuit (docs/methods.md#circuits)."""
    from clipmech.analysis.circuit_similarity import edge_jaccard, mean_node_jaccard, wl_scores
    D = len(domains)
    out: dict[str, list[list[float | None]]] = {m: [[None] * D for _ in range(D)] for m in CIRCUIT_MEASURES}
    for a, da in enumerate(domains):
        for b, db in enumerate(domains):
            if da in circuits and db in circuits:
                ca, cb = circuits[da], circuits[db]
                out["node"][a][b] = mean_node_jaccard(ca, cb, points)
                out["edge"][a][b] = edge_jaccard(ca, cb)
                out["wl_h2"][a][b] = wl_scores(ca, cb, (2,), paper_compat)["wl_h2"]
    return out


def unit_circuits(run_dir: str, opts: AnalysisOptions, class_name: str) -> dict[str, Any]:
    """The circuit of one class in every domain holding it (the `circuit_images` test images of its
    cell from the paper's one shuffle seeded 42, `cell_samples`; fp32 attributions; paper_compat adds
    the wrap-around edges) and `circuit_pair_matrices` between domains:
    {"class", "domains", "node", "edge", "wl_h2": [D, D], "images": {domain: n}, "paper_compat"}."""
    from clipmech.analysis.activations import image_batches
    from clipmech.analysis.circuits import discover_circuit
    from clipmech.analysis.discovery import eap_ig_circuit
    from clipmech.analysis.paper_compat import wraparound_edges
    from clipmech.data.samples import cell_samples
    ctx = RunContext(run_dir, opts)
    ds, model = ctx.source.dataset, ctx.source.model.to(ctx.device)
    k = ds.class_index(class_name)
    head = ctx.source.head(model)
    cells = cell_samples(ds, opts.circuit_images, "test", CIRCUIT_SEED)
    circuits = {}
    for d in ds.domains:
        rows = cells.get((d, ds.classes[k]))
        if rows is not None:
            images = torch.cat(list(image_batches(ds, rows, ctx.source.image_size, opts.batch_size, opts.workers)))
            labels = torch.full((len(rows),), k, dtype=torch.long, device=ctx.device)
            if opts.circuit_method == "paper_ig":
                circuits[d] = discover_circuit(model, images.to(ctx.device), labels, head, steps=opts.circuit_steps)
            else:
                # mean ablation over one test image of each of the domain's first EAP_REFERENCE_CLASSES cells
                ref_rows = [r[0] for (dom, _), r in cells.items() if dom == d][:EAP_REFERENCE_CLASSES]
                reference = torch.cat(list(image_batches(ds, np.asarray(ref_rows), ctx.source.image_size,
                                                         opts.batch_size, opts.workers)))
                circuits[d] = eap_ig_circuit(model, images.to(ctx.device), labels, head, reference.to(ctx.device),
                                             steps=opts.circuit_steps)
            if ctx.paper_compat:
                circuits[d] = wraparound_edges(circuits[d])
    return {"class": ds.classes[k], "domains": ds.domains,
            **circuit_pair_matrices(circuits, ds.domains, ctx.points(), ctx.paper_compat),
            "images": {d: len(cells[(d, ds.classes[k])]) for d in circuits}, "paper_compat": ctx.paper_compat}


def circuit_classes(ctx: RunContext) -> list[str]:
    """The classes that get circuits: the C2 classes, then with circuit_scope "all" every other class
    in dataset order (the paper: all classes, C2 first); the first `circuit_classes` (all when None)."""
    rest = [c for c in ctx.source.dataset.classes if c not in ctx.source.c2] if ctx.opts.circuit_scope == "all" else []
    return (ctx.source.c2 + rest)[: ctx.opts.circuit_classes]


def _class_mean(per_class: Sequence[Mapping[str, Any]], kind: str) -> list[list[float | None]]:
    stack = np.array([[[np.nan if v is None else v for v in row] for row in c[kind]] for c in per_class])
    have = ~np.isnan(stack)
    mean = np.where(have.any(0), np.nansum(stack, 0) / np.maximum(have.sum(0), 1), np.nan)
    return [[None if np.isnan(v) else float(v) for v in row] for row in mean]


def mean_circuit_matrices(per_class: Sequence[Mapping[str, Any]], c2: Sequence[str]) -> dict[str, Any]:
    """Circuit matrices averaged over classes (entries a class lacks are left out): top-level "node",
    "edge", "wl_h2" over the C2 classes (what the model rows use), and "subsets" {"all", "C2", "C1":
    {"classes": n, measure: [D, D]}} as the paper reports them (a subset without classes is absent)."""
    out: dict[str, Any] = {"domains": per_class[0]["domains"], "classes": [c["class"] for c in per_class],
                           "subsets": {}}
    groups = {"all": list(per_class), "C2": [c for c in per_class if c["class"] in c2],
              "C1": [c for c in per_class if c["class"] not in c2]}
    for name, group in groups.items():
        if group:
            out["subsets"][name] = {"classes": len(group), **{m: _class_mean(group, m) for m in CIRCUIT_MEASURES}}
    if "C2" not in out["subsets"]:
        raise ValueError(f"no C2 class among the classes with circuits {out['classes'][:5]}; the model rows need C2")
    return out | {m: out["subsets"]["C2"][m] for m in CIRCUIT_MEASURES}


def unit_controls(run_dir: str, opts: AnalysisOptions, out: str, test_domains: Sequence[str]) -> dict[str, Any]:
    """The per-run plan's controls stage (clipmech.study.controls.controls_model: floors, ceilings,
    normalised scores, the untrained model, faithfulness, the causal test) for each test domain the
    run serves: {domain: model-row fields}. Its registry and preprocessed images live under OUT
    (shared by the runs of one image size). Cost: the circuits of the first `circuit_classes` C2
    classes on test and training drawings (twice: trained and untrained weights), two SAEs, the rest small."""
    from clipmech.study.controls import controls_model
    from clipmech.study.plan import ImageStore, RunAnalysis
    from clipmech.study.registry import Registry
    ctx = RunContext(run_dir, opts)
    ds, size = ctx.source.dataset, ctx.source.image_size
    gb = (len(ds.indices(split="train")) + len(ds.indices(split="test"))) * 3 * size * size * 4 / 1e9
    ra = RunAnalysis(ctx.source, opts.preset(), Registry(Path(out) / "registry"),
                     ImageStore(ds, size, Path(out) / "cache", stream=gb > opts.image_memory_gb))
    return {d: controls_model(ra, d)[0] for d in test_domains}


# ------------------------------------------------------------------------------------ plan
FIRST_STAGE = ("extract", "circuits")  # need nothing but the checkpoint; the rest read the shards


def plan_units(ctx: RunContext, out: str | Path, run_id: str, with_umap: bool,
               test_domains: Sequence[str]) -> dict[str, Unit]:
    """The run's analysis units {name: Unit}: "extract", "circuits/<class>" per circuit class, "cka",
    "sae", "embeddings", "controls" (for `test_domains`). Unit folders are
    OUT/units/<run_id>/<name>-<hash of unit_key>, shards go to
    OUT/shards/<content hash>. GPU jobs unless the options say device "cpu"."""
    out = Path(out)
    gpus = 0 if ctx.opts.device == "cpu" else 1
    shard_root = str(out / "shards")
    run_dir = str(ctx.run_dir)

    def unit(name: str, fn, *args, **extra) -> Unit:
        key = ctx.unit_key(name) | extra
        folder = out / "units" / run_id / f"{name.replace('/', '-')}-{hash_obj(key)[:12]}"
        return Unit(f"{run_id}/{name}", str(folder), fn, args, gpus=gpus)

    units = {"extract": unit("extract", unit_extract, run_dir, ctx.opts, shard_root)}
    for c in circuit_classes(ctx):
        units[f"circuits/{c}"] = unit(f"circuits/{c}", unit_circuits, run_dir, ctx.opts, c)
    units["cka"] = unit("cka", unit_cka, run_dir, ctx.opts, shard_root)
    units["sae"] = unit("sae", unit_sae, run_dir, ctx.opts, shard_root)
    units["embeddings"] = unit("embeddings", unit_embeddings, run_dir, ctx.opts, shard_root, with_umap,
                               umap=with_umap)
    if ctx.opts.controls:
        units["controls"] = unit("controls", unit_controls, run_dir, ctx.opts, str(out), list(test_domains),
                                 test_domains=list(test_domains))
    return units


def collect(units: Mapping[str, Unit], c2: Sequence[str]) -> dict[str, Any]:
    """{"cka", "circuits" (class means, `mean_circuit_matrices`), "sharing", "embeddings", "controls"} from a
    run's finished units; `c2` = the run's C2 classes."""
    from clipmech.launch import unit_result
    per_class = [unit_result(u) for name, u in units.items() if name.startswith("circuits/")]
    return {"cka": unit_result(units["cka"]), "circuits": mean_circuit_matrices(per_class, c2),
            "sharing": unit_result(units["sae"]), "embeddings": unit_result(units["embeddings"]),
            "controls": unit_result(units["controls"]) if "controls" in units else {}}


# ------------------------------------------------------------------------------------ rows
def run_metrics(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{epoch: flat zero-shot metrics | {"per_class": {"{domain}/{C1|C2}": {class: acc}}}} from
    RUN_DIR/eval/results.json and details.json (written by clipmech.eval.zeroshot.evaluate_run)."""
    ev = Path(run_dir) / "eval"
    if not (ev / "results.json").is_file() or not (ev / "details.json").is_file():
        raise FileNotFoundError(f"{ev}/results.json or details.json is missing; evaluate the run with "
                                f"`clipmech eval {run_dir}` (or rerun `clipmech experiment run`)")
    fix = f"evaluate the run again with `clipmech eval {run_dir}`"
    results, details = read_json(ev / "results.json", fix), read_json(ev / "details.json", fix)
    return {e: results[e] | {"per_class": {k: v["per_class"] for k, v in details[e].items() if k != "skipped"}}
            for e in results}


def model_rows(ctx: RunContext, setup: str, seed: int, test_domains: Sequence[str], run_id: str,
               cka: Mapping[str, Any], circuits: Mapping[str, Any], sharing: Mapping[str, Any],
               embeddings: Mapping[str, Any], controls: Mapping[str, Any]
               ) -> tuple[list[dict[str, Any]], dict[str, dict[int, float]]]:
    """(study model rows, {test domain: {epoch: C2 accuracy}}) of one run: one row per test domain,
    with the measures of clipmech.study.report (C2 means) plus the run's model, image size, classes,
    `paper_compat` (the analysis's) and `mixture_paper_compat` (the run config's: its allow-p quotas)."""
    from clipmech.study.plan import row_measures
    from clipmech.study.quickstart import _final_metrics
    metrics = run_metrics(ctx.run_dir)
    domains = ctx.source.dataset.domains
    rows, curves = [], {}
    for d in test_domains:
        accuracy, curve = _final_metrics(metrics, d)
        curves[d] = dict(zip(sorted(map(int, metrics)), curve))
        rows.append({"setup": setup, "seed": seed, "test_domain": d, **accuracy,
                     **row_measures(domains, d, cka, circuits["node"], circuits["edge"], sharing,
                                    embeddings["separation"]),
                     # the run is the trained model: runs that share setup and seed (interpolation
                     # mixtures, allow-p levels) stay distinct models in the statistics
                     "run_id": run_id, "model_id": run_id, "model": ctx.cfg["model"]["name"], "image_size": ctx.source.image_size,
                     "classes": list(ctx.source.dataset.classes), "c2_classes": ctx.source.c2,
                     "checkpoint_hash": ctx.checkpoint_hash, "paper_compat": ctx.paper_compat,
                     "mixture_paper_compat": bool(ctx.cfg["analysis"]["paper_compat"]), **controls.get(d, {})})
    return rows, curves


def stage_label(units: Sequence[Unit]) -> str:
    """"cka+controls+embeddings+sae": the kinds of units a stage runs, for its progress lines."""
    return "+".join(sorted({u.name.split("/")[-1] for u in units}))


def analyse_run(run_dir: str | Path, opts: AnalysisOptions, out: str | Path, launch: LaunchOptions = LaunchOptions(),
                test_domains: Sequence[str] | None = None, with_umap: bool = False) -> list[dict[str, Any]]:
    """Analyse one trained run (every unit, through `launch`) and return its model rows, one per test
    domain (default: the run's [mixture] test_domain). Units and shards go under OUT; finished units
    are reused. Cost: one image pass over the run's test and train splits, then the units."""
    ctx = RunContext(run_dir, opts)
    domains = list(test_domains or [ctx.cfg["mixture"]["test_domain"] or ctx.source.dataset.default_test_domain])
    run_id = ctx.run_dir.name
    units = plan_units(ctx, out, run_id, with_umap, domains)
    first = [u for n, u in units.items() if n.split("/")[0] in FIRST_STAGE]
    run_units(first, launch, stage=f"{run_id} extract+circuits")
    rest = [u for u in units.values() if u not in first]
    run_units(rest, launch, stage=f"{run_id} {stage_label(rest)}")
    m = collect(units, ctx.source.c2)
    rows, _ = model_rows(ctx, ctx.cfg["mixture"]["setup"], int(ctx.cfg["train"]["seed"]), domains, run_id,
                         m["cka"], m["circuits"], m["sharing"], m["embeddings"], m["controls"])
    return rows
