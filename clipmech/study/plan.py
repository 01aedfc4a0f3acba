"""The per-run analysis plan: what is measured on one trained model, whatever the scale.

A `RunAnalysis` is one `Source` (clipmech.analysis.source: the model, dataset, C2 classes,
templates) with a `Preset` (how much to analyse), a `Registry` (finished stages, keyed by their
inputs) and an `ImageStore` (preprocessed images of a split, computed once and shared by every
model of that image size). Its stages, each stored in the registry so a rerun reuses it:

    cka          class-centroid linear CKA between every domain pair, per analysis point (C2 rows)
    circuits     per-(domain, class) circuits of the first C2 classes; node / edge Jaccard between domains
    sae          SAE (seed 0) on the training-split embeddings; feature sharing over the C2 test images
    embeddings   domain separation of the test embeddings (and their UMAP for the figure model)
    controls     floors, ceilings, normalised scores, the untrained model, faithfulness, the causal test
                 (clipmech.study.controls)

The quickstart runs `STAGES` on each model it trains; `clipmech experiment analyse` runs the
controls stage on each run as one unit (clipmech.study.analyse). `row_measures` turns the stage
results into a results row's sharedness fields: a measure that cannot be computed is None, with
its reason in the row's `null_reasons` (docs/results_schema.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from clipmech.analysis.activations import inner_points, pool
from clipmech.analysis.circuit_similarity import edge_jaccard, mean_node_jaccard
from clipmech.analysis.cka import MIN_ROWS, domain_cka
from clipmech.analysis.embeddings import separation_scores, umap_2d
from clipmech.analysis.patching import cache_points
from clipmech.analysis.sae import evaluate_sae
from clipmech.analysis.sharing import feature_sharing, top_latent_histograms
from clipmech.analysis.source import Source
from clipmech.data.preprocess import eval_images, eval_transform_description
from clipmech.eval.zeroshot import embed_images
from clipmech.study.circuit_sets import cell_circuits, circuit_cells
from clipmech.study.controls import controls_model
from clipmech.study.registry import Registry
from clipmech.study.report import cka_mid
from clipmech.study.saes import SAE_BATCH_SIZE, SAE_LR, study_sae
from clipmech.utils import TensorCache

# Bump when a stage's computation changes so stored results are not reused across versions.
STAGE_VERSION = 3  # 3: sparse, standardised SAEs (issue 13)


@dataclass(frozen=True)
class Preset:
    """How much of one model to analyse (hashed into every stage key). The quickstart's defaults are
    sized for its 10-minute budget; docs/methods.md gives the paper's values."""

    circuit_steps: int = 10  # IG Riemann steps (paper: 10)
    circuit_classes: int | None = 8  # first C2 classes with a circuit per domain; None: all (paper: 15);
    # 8 is the analysis plan's min_classes for the causal test (docs/causal-test.md)
    sae_expansion: int = 4  # latents = expansion x embedding width (paper: 4)
    sae_steps: int = 1100  # Adam steps (clipmech.study.saes: the measured choice, with batch and lr)
    sae_batch_size: int = SAE_BATCH_SIZE
    sae_lr: float = SAE_LR
    cka_boot: int = 50  # bootstrap resamples of the CKA CIs
    n_templates: int | None = 7  # first templates of the dataset's set; None: all
    cka_min_rows: int = MIN_ROWS  # a domain pair with fewer C2 centroid rows has no CKA
    # How circuits are discovered (clipmech.analysis.discovery.CIRCUIT_METHODS): the paper's IG, or
    # EAP-IG, the edge method docs/circuit_validity.md recommends (exploratory: the plan names IG).
    circuit_method: str = "paper_ig"
    # Images of a domain's test split in a mean-ablation reference (faithfulness, the causal test,
    # EAP-IG's counterfactual): None, all of them; N, a seeded sample of N (data.samples.capped_rows).
    reference_images: int | None = None

    def analysis_key(self, circuits: bool = True) -> dict[str, Any]:
        """The settings stage results depend on (training enters through the checkpoint hash). The
        circuit method enters only for stages that use circuits (`circuits`) and only when it is not
        the paper's, so stored paper-IG results keep their keys and a study rerun with another
        method reuses its CKA, SAE and embedding stages."""
        method = {} if self.circuit_method == "paper_ig" or not circuits else {"circuit_method": self.circuit_method}
        return {"circuit_steps": self.circuit_steps, "circuit_classes": self.circuit_classes,
                "sae_expansion": self.sae_expansion, "sae_steps": self.sae_steps,
                "sae_batch_size": self.sae_batch_size, "sae_lr": self.sae_lr, "cka_boot": self.cka_boot,
                "n_templates": self.n_templates, "cka_min_rows": self.cka_min_rows,
                "reference_images": self.reference_images, "version": STAGE_VERSION, **method}


class SplitImages:
    """One split's preprocessed images, decoded on access instead of held: `len()`, and indexing by a
    slice or an integer row array gives float32 [n, 3, S, S] equal to the same rows of the in-memory
    tensor. `embed_images` and other batch loops slice it, so a whole split is never in memory at
    once. Cost: decoding the asked rows on every access (nothing is cached)."""

    def __init__(self, dataset, indices: np.ndarray, image_size: int):
        self.dataset, self.indices, self.image_size = dataset, np.asarray(indices), image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows) -> torch.Tensor:
        if not isinstance(rows, slice):
            rows = np.asarray(rows)
            if rows.ndim != 1 or not (rows.dtype.kind in "iu" or len(rows) == 0):
                raise TypeError(f"SplitImages takes a slice or a 1-d integer row array, got {rows.dtype} "
                                f"with shape {rows.shape}")
            rows = rows.astype(np.int64)
        selected = self.indices[rows]
        if not len(selected):
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return eval_images(self.dataset, selected, self.image_size)


class ImageStore:
    """Preprocessed images of a dataset's splits at one image size, float32 [N, 3, S, S] in
    `dataset.indices(split)` order: computed once per (dataset, split, size), kept on disk
    (TensorCache under `cache_dir`) and in memory. With `stream`, `images(split)` is a `SplitImages`
    that decodes the rows each access asks for (memory: one batch; for data too large to hold).
    Cost on a miss: decoding every image of the split."""

    def __init__(self, dataset, image_size: int, cache_dir: str | Path, stream: bool = False):
        self.dataset, self.image_size, self.cache = dataset, image_size, TensorCache(Path(cache_dir))
        self.stream = stream
        self._images: dict[str, torch.Tensor] = {}

    def images(self, split: str) -> torch.Tensor | SplitImages:
        if self.stream:
            return SplitImages(self.dataset, self.dataset.indices(split=split), self.image_size)
        if split not in self._images:
            idx = self.dataset.indices(split=split)
            self._images[split] = self.cache.get_or_compute(
                self._key(split), lambda: eval_images(self.dataset, idx, self.image_size))
        return self._images[split]

    def cached(self, split: str) -> bool:
        """Whether `images(split)` will be read from memory or the on-disk cache (streamed: never)."""
        return not self.stream and (split in self._images or self.cache.path(self._key(split)).exists())

    def _key(self, split: str) -> dict[str, Any]:
        return {"dataset": self.dataset.content_hash(), "split": split,
                "n": int(len(self.dataset.indices(split=split))),
                "transform": eval_transform_description(self.image_size)}


@dataclass
class RunAnalysis:
    """One model under the plan: its Source, the Preset, where stages are stored and its images."""

    source: Source
    opts: Preset
    registry: Registry
    store: ImageStore

    @property
    def dataset(self):
        return self.source.dataset

    @property
    def c2(self) -> list[str]:
        return self.source.c2

    @property
    def model(self):
        return self.source.model

    @property
    def checkpoint_hash(self) -> str:
        """The weights' content key (a checkpoint's file hash): every stage key holds it."""
        return self.source.model_key.removeprefix("file:")

    def templates(self) -> list[str]:
        return self.source.templates

    def images(self, split: str) -> torch.Tensor | SplitImages:
        return self.store.images(split)


# ------------------------------------------------------------------------------------ stages
def pooled_activations(model, images: torch.Tensor, points: Sequence[str], batch_size: int = 512
                       ) -> dict[str, torch.Tensor]:
    """{point: [N, C]} mean-pooled activations (spatial mean of conv maps, token mean of sequences) of
    already preprocessed `images`, fed through clipmech.analysis.patching.cache_points."""
    chunks: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    for i in range(0, len(images), batch_size):
        for p, act in cache_points(model, images[i:i + batch_size], points).items():
            chunks[p].append(pool(act, "mean"))
    return {p: torch.cat(v) for p, v in chunks.items()}


def _test_split(ra: RunAnalysis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, class_idx, domain_idx) of the test split (every domain, every class)."""
    idx = ra.dataset.indices(split="test")
    return idx, ra.dataset.class_idx[idx], ra.dataset.domain_idx[idx]


def cka_model(ra: RunAnalysis) -> tuple[dict[str, Any], bool]:
    """Linear, unbiased, class-centroid CKA between every domain pair at every analysis point except
    the input; rows = C2 class centroids of mean-pooled test activations (docs/methods.md#cka).
    Returns clipmech.analysis.cka.domain_cka's JSON-able dict."""
    key = {"stage": "cka", "checkpoint": ra.checkpoint_hash, "dataset": ra.dataset.content_hash(), "c2": ra.c2,
           **ra.opts.analysis_key(circuits=False)}

    def compute() -> dict:
        _, cls, dom = _test_split(ra)
        feats = pooled_activations(ra.model, ra.images("test"), inner_points(ra.model.analysis_points()))
        return domain_cka(feats, cls, dom, ra.dataset.domains, {"C2": ra.source.c2_idx}, mode="centroid",
                          kernels=("linear",), n_boot=ra.opts.cka_boot, n_perm=0, min_rows=ra.opts.cka_min_rows)

    return ra.registry.run("cka", key, compute)


def cka_pairs(cka_result: Mapping[str, Any], subset: str = "C2") -> dict[tuple[str, str], list[float]]:
    """{(a, b): linear CKA per point} from a domain_cka result; pairs with an undefined value are dropped."""
    out = {}
    for pair, res in cka_result["results"][subset]["linear"].items():
        if all(v is not None for v in res["cka"]):
            a, b = pair.split("|")
            out[(a, b)] = res["cka"]
    return out


def circuits_model(ra: RunAnalysis) -> tuple[dict[str, Any], bool]:
    """Per-(domain, class) circuits on up to 50 test images per cell (`circuit_sets.circuit_cells`) for
    the first `circuit_classes` C2 classes (stored once, reused by the controls); node Jaccard (mean
    over the points except the input) and edge Jaccard between domains, averaged over classes
    (docs/methods.md#circuits). Returns {"domains", "classes", "node": [D, D], "edge": [D, D]}."""
    ds = ra.dataset
    test_cells, _ = circuit_cells(ra)
    circuits, reused = cell_circuits(ra, ra.model, ra.checkpoint_hash, test_cells, "test")
    points = inner_points(ra.model.analysis_points())
    D = len(ds.domains)
    node, edge = [[None] * D for _ in range(D)], [[None] * D for _ in range(D)]
    for a, da in enumerate(ds.domains):
        for b, db in enumerate(ds.domains):
            shared = [k for k in circuits[da] if k in circuits[db]]
            if shared:
                node[a][b] = float(np.mean([mean_node_jaccard(circuits[da][k], circuits[db][k], points)
                                            for k in shared]))
                edge[a][b] = float(np.mean([edge_jaccard(circuits[da][k], circuits[db][k]) for k in shared]))
    classes = ra.c2[: ra.opts.circuit_classes]
    return {"domains": ds.domains, "classes": classes, "node": node, "edge": edge}, reused


def sae_sharing_model(ra: RunAnalysis) -> tuple[dict[str, Any], bool]:
    """SAE (seed 0, `clipmech.study.saes.study_sae`) on the L2-normalised image embeddings of the train
    split (all domains), then feature sharing (docs/methods.md#feature-sharing) over the C2 test
    images. Returns feature_sharing's dict + SAE metrics."""
    key = {"stage": "sae", "checkpoint": ra.checkpoint_hash, "dataset": ra.dataset.content_hash(), "c2": ra.c2,
           **ra.opts.analysis_key(circuits=False)}

    def compute() -> dict:
        ds, c2 = ra.dataset, ra.source.c2_idx
        train_x = embed_images(ra.model, ra.images("train"))
        sae, info, _ = study_sae(ra, ra.checkpoint_hash, train_x, seed=0)
        test = ds.indices(split="test")
        rows = np.flatnonzero(np.isin(ds.class_idx[test], c2))
        with torch.no_grad():
            codes = sae.encode(embed_images(ra.model, ra.images("test")[rows]))
        H = top_latent_histograms(codes, ds.class_idx[test][rows], ds.domain_idx[test][rows], c2, len(ds.domains))
        out = feature_sharing(H, ds.domains, class_names=ra.c2)
        out.pop("per_class")
        return out | {"sae": evaluate_sae(sae, train_x), "sae_last_epoch": info["last_epoch"]}

    return ra.registry.run("sae", key, compute)


def embeddings_model(ra: RunAnalysis, with_umap: bool) -> tuple[dict[str, Any], bool]:
    """Domain separation of the normalised test embeddings (silhouette, cross-validated domain-probe
    accuracy), and 2-D UMAP coordinates if asked."""
    key = {"stage": "embeddings", "checkpoint": ra.checkpoint_hash, "dataset": ra.dataset.content_hash(),
           "umap": with_umap, **ra.opts.analysis_key(circuits=False)}

    def compute() -> dict:
        _, _, dom = _test_split(ra)
        emb = embed_images(ra.model, ra.images("test")).numpy()
        out = {"separation": separation_scores(emb, dom, ra.dataset.domains)["overall"]}
        if with_umap:
            out["umap"] = np.asarray(umap_2d(emb)).tolist()
            out["domain_idx"] = dom.tolist()
        return out

    return ra.registry.run("embeddings", key, compute)


def stages(ra: RunAnalysis, test_domain: str, with_umap: bool
           ) -> list[tuple[str, str, Callable[[], tuple[Any, bool]]]]:
    """The plan for one model and test domain, in order: (progress name, result name, run) where
    run() -> (result, reused)."""
    return [("CKA", "cka", lambda: cka_model(ra)), ("circuits", "circuits", lambda: circuits_model(ra)),
            ("SAE", "sharing", lambda: sae_sharing_model(ra)),
            ("embeddings", "emb", lambda: embeddings_model(ra, with_umap)),
            ("controls", "controls", lambda: controls_model(ra, test_domain))]


# ------------------------------------------------------------------------------------ rows
def mean_vs_others(matrix: Sequence[Sequence[float | None]], domains: Sequence[str], d: str
                   ) -> tuple[float | None, str | None]:
    """(mean of row `d` over the other domains, None) -- the paper's score(d*) -- or (None, reason)
    when no other domain has a value."""
    i = list(domains).index(d)
    vals = [matrix[i][j] for j in range(len(domains)) if j != i and matrix[i][j] is not None
            and math.isfinite(matrix[i][j])]
    if not vals:
        return None, f"no similarity between test domain {d!r} and any other domain was computed"
    return float(np.mean(vals)), None


def cka_measure(cka_result: Mapping[str, Any], test_domain: str) -> tuple[float | None, str | None]:
    """(cka_mid, None), or (None, "C2 rows n < min") when no C2 pair with the test domain had enough
    centroid rows to be computed (domain_cka's "skipped")."""
    pairs = cka_pairs(cka_result)
    if any(test_domain in p for p in pairs):
        return cka_mid(pairs, test_domain), None
    rows = [s.get("n_rows", 0) for s in cka_result.get("skipped", [])
            if s["subset"] == "C2" and test_domain in s["pair"].split("|")]
    return None, (f"C2 rows {max(rows, default=0)} < {cka_result.get('min_rows', MIN_ROWS)}: no CKA pair with "
                  f"test domain {test_domain!r} has enough C2 classes")


def row_measures(domains: Sequence[str], test_domain: str, cka: Mapping[str, Any], node, edge,
                 sharing: Mapping[str, Any], separation: float | None) -> dict[str, Any]:
    """A results row's sharedness fields for `test_domain` (cka_mid, node_jaccard, edge_jaccard,
    feature_sharing, embedding_separation) from the stage results; each uncomputable one is None,
    with its reason under "null_reasons"."""
    reasons: dict[str, str] = {}
    row: dict[str, Any] = {}
    for name, (value, reason) in (("cka_mid", cka_measure(cka, test_domain)),
                                  ("node_jaccard", mean_vs_others(node, domains, test_domain)),
                                  ("edge_jaccard", mean_vs_others(edge, domains, test_domain))):
        row[name] = value
        if reason:
            reasons[name] = reason
    row["feature_sharing"] = sharing["score"].get(test_domain)
    if row["feature_sharing"] is None:
        reasons["feature_sharing"] = f"no C2 image of test domain {test_domain!r} to compare"
    row["embedding_separation"] = separation
    return row | {"null_reasons": reasons}
