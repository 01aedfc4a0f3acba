"""The sharedness controls of the per-run analysis plan (clipmech.study.plan), per model: floors,
ceilings and normalised values of every sharedness score, faithfulness over circuit sizes,
sparse-SAE metrics and the de-confounded causal test (docs/methods.md#controls). The quickstart and
`experiment analyse` both run `controls_model` on a `RunAnalysis`. Composes
clipmech.analysis.controls / .circuits / .sharing / .sae / .cka.

The unit is a distinct drawing (emoji: training views of one drawing never count twice; only view 0
is used). Drawing sets per (domain, class) cell (`clipmech.study.circuit_sets.circuit_cells`): the
score's circuits are the circuit stage's own (the cell's test drawings); the "repeat" circuits use
as many of its distinct training drawings. A cell with fewer training drawings than test drawings
has no repeat (skipped, counted). Circuit sets are stored once per weights, so a model shared by two
rows and the untrained checkpoint (identical across the setups of one seed) are analysed once.

- node / edge Jaccard, WL (h = 1, `WL_H`): `analysis.controls.circuit_nulls` on those circuits;
  a second floor from the untrained (epoch-0) checkpoint's score.
- feature sharing: two SAEs (seeds 0 and 1) on the training-split embeddings; ceiling = each cell
  with itself across seeds on Hungarian-matched latents (cosine >= 0.7); floor = class-permuted.
- CKA (linear, unbiased, class centroids, middle third of the points): floor = row-permutation
  baseline and the untrained model; ceiling = test-drawing vs training-drawing centroids of one domain.
- causal test: circuits discovered on the training drawings, ablated on the held-out test drawings.
- faithfulness: the training-drawing circuits evaluated on the test drawings, mean and resample
  ablation.
Normalisation uses the class-permuted (CKA: permutation) floor and the ceiling on the score's own
domain pairs (`ceiling_pairs`: the test domain's and the other domain's retest values averaged per
pair; the pooled ceiling over every domain is kept beside); the untrained floor is reported beside,
with its own class-permuted floor. The placebo causal test: `clipmech.study.causal`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from clipmech.analysis.activations import inner_points, pool
from clipmech.analysis.cka import cka
from clipmech.analysis.circuit_similarity import edge_jaccard, mean_node_jaccard, wl_kernel
from clipmech.analysis.circuits import (FAITHFULNESS_SIZES, Circuit, ablation_values, faithfulness_curve,
                                        resample_values)
from clipmech.analysis.controls import circuit_nulls, estimate, matched_causal_test, normalize
from clipmech.analysis.patching import cache_points
from clipmech.analysis.sae import evaluate_sae
from clipmech.analysis.sharing import (match_latents, pair_shares, require_sparse, seed_ceiling,
                                       top_latent_histograms)
from clipmech.data.samples import capped_rows, check_disjoint_drawings, distinct_drawings
from clipmech.eval.zeroshot import embed_images
from clipmech.models.hooked_clip import HookedCLIP
from clipmech.study.causal import study_causal_test
from clipmech.study.circuit_sets import cell_circuits, circuit_cells
from clipmech.study.report import middle_third
from clipmech.study.saes import study_sae
from clipmech.utils import file_hash, state_dict_hash

CONTROL_SCORES = ("node_jaccard", "edge_jaccard", "wl", "feature_sharing", "cka_mid")
WL_H = 1
CONTROLS_VERSION = 5  # 2: standardised SAE inputs; 3: circuit sets and SAEs shared; 4: causal verdict with p*;
# 5: the placebo causal test (clipmech.study.causal), the untrained class-permuted floor, same-pair ceilings
N_PERM = 20  # CKA row permutations per domain pair


SIMILARITIES: dict[str, Callable[[Circuit, Circuit], float]] = {
    "node_jaccard": mean_node_jaccard,
    "edge_jaccard": edge_jaccard,
    "wl": lambda a, b: wl_kernel(a, b, h=WL_H),
}


# ------------------------------------------------------------------------------------ parts
def circuit_controls(study, model, keys: Mapping[str, str], untrained, test_domain: str) -> tuple[dict, dict]:
    """(nulls per circuit score incl. the untrained floor, the training-drawing circuits). `keys`:
    {"model", "untrained"} weight hashes identifying the circuit sets (`circuit_sets.cell_circuits`;
    the score's set is the circuit stage's own)."""
    test_cells, repeat_cells = circuit_cells(study)
    score_c = cell_circuits(study, model, keys["model"], test_cells, "test")[0]
    repeat_c = cell_circuits(study, model, keys["model"], repeat_cells, "train")[0]
    untrained_c = cell_circuits(study, untrained, keys["untrained"], test_cells, "test")[0]
    out = {}
    for name, sim in SIMILARITIES.items():
        res = circuit_nulls(score_c, repeat_c, test_domain, sim)
        untrained_nulls = circuit_nulls(untrained_c, {}, test_domain, sim)
        res["floor_untrained"] = untrained_nulls["score"]
        # the untrained net's own class-permuted floor: how much of its score is input-independent
        res["floor_untrained_permuted"] = untrained_nulls["floor"]
        out[name] = res
    return out, repeat_c


def causal_controls(study, model, discovery, test_domain: str) -> dict[str, Any]:
    """De-confounded causal test on the test domain (discovery: training drawings; ablation: test drawings)."""
    ds, images = study.dataset, study.images("test")
    idx = ds.indices(split="test")
    di = ds.domains.index(test_domain)
    held = {}
    for k, c in discovery.get(test_domain, {}).items():
        rows = np.flatnonzero((ds.domain_idx[idx] == di) & (ds.class_idx[idx] == k))
        held[k] = (images[rows], torch.full((len(rows),), k, dtype=torch.long))
        # the same drawing (style and class, file or pixels), not the same row: split rows never overlap
        check_disjoint_drawings(ds, ds.indices(split="train")[c.meta["rows"]], idx[rows],
                                what=f"causal test, class {ds.classes[k]!r}")
    reference = images[capped_rows(np.flatnonzero(ds.domain_idx[idx] == di), study.opts.reference_images)]
    res = matched_causal_test(model, discovery, test_domain, held, study.source.head(model), reference=reference)
    res["per_class"] = {ds.classes[int(k)]: v for k, v in res["per_class"].items()}
    return res


def faithfulness_controls(study, model, discovery, seed: int = 0) -> dict[str, Any]:
    """Faithfulness curves of the training-drawing circuits on the test drawings, per domain (mean
    over classes, bootstrap CI), mean and resample ablation."""
    ds, images = study.dataset, study.images("test")
    idx = ds.indices(split="test")
    head = study.source.head(model)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"skipped": 0, "domains": {}, "sizes": list(FAITHFULNESS_SIZES)}
    for d, per in discovery.items():
        di = ds.domains.index(d)
        in_domain = np.flatnonzero(ds.domain_idx[idx] == di)
        points = inner_points(next(iter(per.values())).points) if per else []
        reference = images[capped_rows(in_domain, study.opts.reference_images)] if per else None
        mean_fill = ablation_values(model, reference, points, "mean") if per else None
        curves: dict[str, list] = {"mean": [], "resample": []}
        for k, circuit in per.items():
            rows = in_domain[ds.class_idx[idx][in_domain] == k]
            others = in_domain[ds.class_idx[idx][in_domain] != k]
            labels = torch.full((len(rows),), k, dtype=torch.long)
            fills = {"mean": mean_fill}
            if len(others):  # resample donors: same-domain test drawings of other classes
                fills["resample"] = resample_values(model, images[rng.choice(others, len(rows))], points)
            for how, fill in fills.items():
                r = faithfulness_curve(model, circuit, images[rows], labels, head, fill=fill, points=points)
                out["skipped"] += r["f"] is None
                curves[how].append(r)
        out["domains"][d] = {how: {"auc": estimate([r["auc"] for r in rs if r["f"] is not None]),
                                   "distance": estimate([r["distance"] for r in rs if r["f"] is not None]),
                                   "f_mean": (np.mean([r["f"] for r in rs if r["f"] is not None], 0).tolist()
                                              if any(r["f"] is not None for r in rs) else None)}
                             for how, rs in curves.items()}
    return out


def sae_controls(study, model, model_key: str, test_domain: str) -> dict[str, Any]:
    """Two SAE seeds on the training-split embeddings (held-out images only encoded; seed 0 is the SAE
    stage's own, `clipmech.study.saes.study_sae`): metrics, the seed matching, and feature sharing's
    score, class-permuted floor and seed ceiling."""
    ds = study.dataset
    train_x = embed_images(model, study.images("train"))
    saes = [study_sae(study, model_key, train_x, seed=s)[0] for s in (0, 1)]
    idx = ds.indices(split="test")
    c2 = [ds.classes.index(c) for c in study.c2]
    rows = np.flatnonzero(np.isin(ds.class_idx[idx], c2))
    test_x = embed_images(model, study.images("test")[rows])
    out: dict[str, Any] = {"l1_coef": saes[0].cfg.l1_coef, "train": evaluate_sae(saes[0], train_x),
                           "held_out": evaluate_sae(saes[0], test_x), "n_train": len(train_x)}
    try:
        require_sparse(out["train"]["l0"], train_x.shape[1])
    except ValueError as err:
        return out | {"reason": str(err)}
    match = match_latents(saes[0].W_dec.detach(), saes[1].W_dec.detach())
    with torch.no_grad():
        H = [top_latent_histograms(s.encode(test_x), ds.class_idx[idx][rows], ds.domain_idx[idx][rows], c2,
                                   len(ds.domains)) for s in saes]
    d = ds.domains.index(test_domain)
    cells = seed_ceiling(H[0], H[1], match)  # (C, D)
    ceiling = np.nanmean(cells, 1)
    others = [b for b in range(cells.shape[1]) if b != d]
    with np.errstate(invalid="ignore"):  # a class without any image pair stays NaN and is dropped
        ceiling_pairs = np.nanmean((cells[:, [d]] + cells[:, others]) / 2, 1)
    per_class = pair_shares(H[0], d)
    return out | {"fraction_matched": match["fraction_matched"], "match_threshold": match["threshold"],
                  "score": estimate(per_class) | {"per_class": [float(v) for v in per_class if np.isfinite(v)]},
                  "floor": estimate(pair_shares(H[0], d, permuted=True)),
                  "ceiling": estimate(ceiling), "ceiling_pairs": estimate(ceiling_pairs)}


def _centroids(model, images: torch.Tensor, dom: np.ndarray, cls: np.ndarray, classes: Sequence[int],
               n_domains: int) -> dict[str, np.ndarray]:
    """{point: [D, K, C]} class centroids of mean-pooled activations (NaN where a cell is empty)."""
    acts = {p: pool(a, "mean").double().numpy()
            for p, a in cache_points(model, images, inner_points(model.analysis_points())).items()}
    out = {}
    for p, a in acts.items():
        c = np.full((n_domains, len(classes), a.shape[1]), np.nan)
        for d in range(n_domains):
            for i, k in enumerate(classes):
                sel = (dom == d) & (cls == k)
                if sel.any():
                    c[d, i] = a[sel].mean(0)
        out[p] = c
    return out


def _mid_cka(X: Mapping[str, np.ndarray], Y: Mapping[str, np.ndarray]) -> float:
    """Linear unbiased CKA of two centroid tables per point, mean over the middle third of points;
    classes missing on either side are dropped."""
    pts = list(X)[middle_third(len(X))]
    vals = []
    for p in pts:
        ok = ~np.isnan(X[p]).any(1) & ~np.isnan(Y[p]).any(1)
        vals.append(cka(X[p][ok], Y[p][ok]))
    return float(np.mean(vals))


def cka_controls(study, model, untrained, test_domain: str, seed: int = 0) -> dict[str, Any]:
    """cka_mid score (per other domain), permutation and untrained floors, and the disjoint-drawings
    ceiling (test vs training-drawing centroids of each domain)."""
    ds = study.dataset
    c2 = [ds.classes.index(c) for c in study.c2]
    if len(c2) < study.opts.cka_min_rows:  # the score itself is not computed on so few rows (plan.cka_measure)
        return {"reason": f"C2 rows {len(c2)} < {study.opts.cka_min_rows}: too few C2 classes for a centroid CKA"}
    D, t = len(ds.domains), ds.domains.index(test_domain)
    tables = {}
    for name, m, split in (("test", model, "test"), ("train", model, "train"), ("untrained", untrained, "test")):
        idx = ds.indices(split=split)
        rows = np.flatnonzero(np.isin(ds.class_idx[idx], c2) & distinct_drawings(ds)[idx])
        # the ceiling's training centroids use one drawing per cell, as the test split holds
        _, first = np.unique(np.stack([ds.domain_idx[idx][rows], ds.class_idx[idx][rows]]), axis=1, return_index=True)
        rows = rows[np.sort(first)] if split == "train" else rows
        tables[name] = _centroids(m, study.images(split)[rows], ds.domain_idx[idx][rows], ds.class_idx[idx][rows], c2, D)
    at = lambda table, d: {p: v[d] for p, v in table.items()}  # noqa: E731
    rng = np.random.default_rng(seed)
    others = [b for b in range(D) if b != t]
    score = [_mid_cka(at(tables["test"], t), at(tables["test"], b)) for b in others]
    perm = [np.mean([_mid_cka(at(tables["test"], t), {p: v[b][pi] for p, v in tables["test"].items()})
                     for pi in (rng.permutation(len(c2)) for _ in range(N_PERM))]) for b in others]
    ceiling = [_mid_cka(at(tables["test"], d), at(tables["train"], d)) for d in range(D)]
    ceiling_pairs = [(ceiling[t] + ceiling[b]) / 2 for b in others]  # on the score's domain pairs only
    untrained_score = [_mid_cka(at(tables["untrained"], t), at(tables["untrained"], b)) for b in others]
    return {"score": estimate(score), "floor": estimate(perm), "ceiling": estimate(ceiling),
            "ceiling_pairs": estimate(ceiling_pairs),
            "floor_untrained": estimate(untrained_score), "n_perm": N_PERM}


# ------------------------------------------------------------------------------------ composition
def controls_model(study, test_domain: str) -> tuple[dict[str, Any], bool]:
    """All controls of one model (`study`: a clipmech.study.plan.RunAnalysis) on `test_domain`, stored in
    its registry. Returns (model-row fields, reused): `<score>_floor/_ceiling/_norm` for CONTROL_SCORES,
    `wl`, `faithfulness_auc`, `sae_l0/_fvu/_dead`, `causal_*`, and `controls` (details: CIs, reasons,
    untrained floors, curves, CPU seconds per part). Needs the run's untrained checkpoint (epoch_0.pt)."""
    epoch0 = study.source.untrained_checkpoint
    if epoch0 is None:
        raise FileNotFoundError(f"no epoch_0.pt beside {study.source.checkpoint}: the untrained floor needs the "
                                "epoch-0 checkpoint")
    model = study.model
    key = {"stage": "controls", "checkpoint": study.checkpoint_hash, "untrained": file_hash(epoch0),
           "dataset": study.dataset.content_hash(), "c2": study.c2, "test_domain": test_domain,
           **study.opts.analysis_key(), "controls_version": CONTROLS_VERSION}

    def compute() -> dict:
        untrained = HookedCLIP.from_checkpoint(epoch0).eval()
        cpu: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            t = time.process_time()
            value = fn()
            cpu[name] = round(time.process_time() - t, 2)
            return value

        keys = {"model": study.checkpoint_hash, "untrained": state_dict_hash(untrained.state_dict())}
        nulls, discovery = timed("circuits", lambda: circuit_controls(study, model, keys, untrained, test_domain))
        nulls["feature_sharing"] = timed("sae", lambda: sae_controls(study, model, keys["model"], test_domain))
        nulls["cka_mid"] = timed("cka", lambda: cka_controls(study, model, untrained, test_domain))
        causal = timed("causal", lambda: causal_controls(study, model, discovery, test_domain))
        causal_test = timed("causal_test", lambda: study_causal_test(study, model, discovery, test_domain))
        # faithfulness covers every domain, so a model shared by two rows (natural-only) computes it once
        faith = timed("faithfulness", lambda: study.registry.run(
            "faithfulness", {k: v for k, v in key.items() if k not in ("stage", "test_domain")} | {"stage": "faithfulness"},
            lambda: faithfulness_controls(study, model, discovery))[0])
        return {"nulls": nulls, "causal": causal, "causal_test": causal_test, "faithfulness": faith, "cpu_s": cpu}

    details, reused = study.registry.run("controls", key, compute)
    return row_fields(details, test_domain), reused


def row_fields(details: Mapping[str, Any], test_domain: str) -> dict[str, Any]:
    """Flat model-row fields from `controls_model`'s details (see there)."""
    row: dict[str, Any] = {}
    reasons = {}
    for name in CONTROL_SCORES:
        n = details["nulls"][name]
        score = (n.get("score") or {}).get("mean")
        row[f"{name}_floor"] = (n.get("floor") or {}).get("mean")
        # normalise by the ceiling on the score's own domain pairs (issue 26); the pooled one is kept beside
        ceiling = n.get("ceiling_pairs") or n.get("ceiling")
        row[f"{name}_ceiling"] = (ceiling or {}).get("mean")
        row[f"{name}_norm"], reasons[name] = normalize(score, n.get("floor"), ceiling)
        if n.get("reason"):
            reasons[name] = n["reason"]
    row["wl"] = details["nulls"]["wl"]["score"]["mean"]
    sae = details["nulls"]["feature_sharing"]
    row |= {"sae_l0": sae["train"]["l0"], "sae_fvu": sae["train"]["fvu"], "sae_dead": sae["train"]["dead_fraction"]}
    faith = details["faithfulness"]["domains"].get(test_domain, {})
    row["faithfulness_auc"] = faith.get("mean", {}).get("auc", {}).get("mean")
    causal = details["causal"]
    for what in ("logit", "accuracy"):
        e = causal[f"effect_{what}"]
        row[f"causal_effect_{what}"] = e["mean"]
        row[f"causal_effect_{what}_ci"] = e["ci"]
    row["causal_verdict"] = causal["verdict"]["verdict"]
    row["causal_trimmed_fraction"] = causal["trimmed_fraction"]
    row["controls"] = dict(details) | {"norm_reasons": reasons}
    return row


# ------------------------------------------------------------------------------------ budget, figures
FIGURE_NOTES = {
    "sharedness_controls.png": "Each sharedness score of every model (o) with its floor (v, class-permuted; CKA: "
                               "row-permuted), ceiling (^, disjoint drawings; feature sharing: second SAE seed) "
                               "and the untrained model's score (x); the band spans floor to ceiling.",
    "faithfulness.png": "One panel per model: faithfulness f(x) of the training-drawing circuits on held-out "
                        "drawings when only the top x of nodes per point is kept, per domain (solid: mean, dashed: "
                        "resample ablation).",
}
def controls_budget(opts) -> float:
    """Planned seconds of one model's controls on an idle 2-core CPU (drives the progress estimate):
    the training-drawing circuits (the test-drawing ones are the circuit stage's, the untrained ones
    shared by a seed's setups) at ~0.03 s per IG step and cell, the second SAE seed, the placebo
    causal test (~0.9 s per class: 3 classes took 2.6 s CPU, one thread), the rest."""
    cells = 6 * opts.circuit_classes
    return 1.3 * cells * 0.03 * opts.circuit_steps + 0.002 * opts.sae_steps + 0.9 * opts.circuit_classes + 5.0


def draw_controls_figures(models: Sequence[Mapping[str, Any]], fig_dir: Path) -> list[Path]:
    """`sharedness_controls.png` (each score per model with its floor-ceiling band) and
    `faithfulness.png` (small multiples: mean f(x) per domain of every model, mean and resample
    ablation)."""
    from clipmech.study.figures import faithfulness_curves, sharedness_controls
    return [sharedness_controls(models, CONTROL_SCORES, fig_dir / "sharedness_controls.png"),
            faithfulness_curves(models, fig_dir / "faithfulness.png")]
