"""Controls for the sharedness analyses (issue 13): floors and ceilings for every sharedness score, their
normalisation, and a de-confounded causal test of the "shared circuitry" claim.

A sharedness score means something only beside what it is by chance (floor) and at most (ceiling):
- circuit scores (node / edge Jaccard, WL): score = same class, test domain vs each other domain;
  floor = different classes in the same domain pairs (class-permuted); ceiling = same (domain, class)
  cell, circuits of two disjoint sets of drawings of the same size as the score's (`circuit_nulls`);
- `estimate` gives each a mean with a bootstrap CI over classes; `normalize` gives
  (score - floor) / (ceiling - floor) only where the ceiling's CI lies above the floor's, else None
  and the reason.

Causal test (`matched_causal_test`): circuits are discovered on one set of drawings and ablated on a
disjoint, held-out set (the caller guarantees disjointness: the study and `clipmech analyze circuits`
record the rows used). "Shared" nodes (in the test domain's class-k circuit and the class-k circuit of another domain) are ablated
against controls drawn without replacement from unshared nodes of the same circuit and circuit nodes
of other classes at the same point, matched on size and IG score: per point, strata are quantiles of
the class-k node scores of shared + pool nodes; within a stratum as many controls are drawn as
shared nodes, and where the pool is short the stratum's excess shared nodes are trimmed (randomly),
the trimmed fraction reported (`matched_controls`). Effects are per class (paired: drop after
ablating shared nodes minus drop after ablating the matched controls), with a bootstrap CI over
classes. A class without a shared node, without held-out drawings, or whose shared nodes are all
trimmed is skipped and counted.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from clipmech.analysis.activations import inner_points
from clipmech.analysis.bootstrap import adaptive_bootstrap, decide, tail_probability
from clipmech.analysis.circuit_similarity import mean_with_ci
from clipmech.analysis.circuits import Circuit, ablated_embedding, ablation_values, shared_nodes
from clipmech.analysis.patching import cosine_logits

Circuits = Mapping[str, Mapping[Any, Circuit]]  # circuits[domain][class]


# ------------------------------------------------------------------------------------ estimates
def estimate(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci" (95 % bootstrap over the values, None when n < 2), "n"} of the finite values;
    mean None when there are none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": None, "ci": None, "n": 0}
    if len(v) < 2:
        return {"mean": float(v[0]), "ci": None, "n": 1}
    return mean_with_ci(v, n_boot=n_boot, seed=seed)


def causal_verdict(effects: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The study's rule (`clipmech.analysis.bootstrap.decide`: bootstrap tail probability p* with its
    Monte-Carlo SE, adaptive resampling) on one model's per-class causal effects (positive = shared
    nodes matter more), resampling classes. Returns {"verdict", "p_star", "p_star_se", "n_boot"};
    verdict "not measured" without a class, "no CI (one class)" with one (p* None)."""
    v = np.asarray([e for e in effects if e is not None and np.isfinite(e)], dtype=float)
    if v.size < 2:
        return {"verdict": "not measured" if v.size == 0 else "no CI (one class)", "p_star": None,
                "p_star_se": None, "n_boot": 0}
    boots = adaptive_bootstrap(lambda rng, b: v[rng.integers(0, v.size, (b, v.size))].mean(1), n_boot, seed=seed)
    p, se = tail_probability(boots)
    return {"verdict": decide(p, se), "p_star": p, "p_star_se": se, "n_boot": int(boots.size)}


def normalize(score: float | None, floor: Mapping[str, Any] | None, ceiling: Mapping[str, Any] | None
              ) -> tuple[float | None, str | None]:
    """(score - floor) / (ceiling - floor) and None, or None and the reason it is undefined: a
    missing score, floor or ceiling, a floor or ceiling without CI, or a ceiling whose CI does not lie
    entirely above the floor's."""
    if score is None:
        return None, "no score"
    for name, e in (("floor", floor), ("ceiling", ceiling)):
        if e is None or e.get("mean") is None:
            return None, f"no {name}" + (f": {e['reason']}" if e and e.get("reason") else "")
        if e.get("ci") is None:
            return None, f"the {name} has no CI (n = {e.get('n')})"
    if not ceiling["ci"][0] > floor["ci"][1]:
        return None, (f"ceiling {ceiling['mean']:.3f} (CI {ceiling['ci'][0]:.3f}-{ceiling['ci'][1]:.3f}) does not "
                      f"exceed floor {floor['mean']:.3f} (CI {floor['ci'][0]:.3f}-{floor['ci'][1]:.3f}) beyond their CIs")
    return float((score - floor["mean"]) / (ceiling["mean"] - floor["mean"])), None


# ------------------------------------------------------------------------------ circuit nulls
def circuit_nulls(circuits: Circuits, repeats: Circuits, test_domain: str,
                  similarity: Callable[[Circuit, Circuit], float]) -> dict[str, Any]:
    """Score, class-permuted floor and disjoint-drawings ceiling of one circuit similarity.

    `circuits[d][k]`: the score's circuits; `repeats[d][k]`: circuits of the same cells from other,
    disjoint drawings (same count). Per class k: score = mean over other domains b of
    similarity(C[d*][k], C[b][k]); floor = mean over b and classes k' != k of similarity(C[d*][k],
    C[b][k']); ceiling = mean over domains d having a repeat of similarity(C[d][k], R[d][k]);
    ceiling_pairs = the same test-retest similarities on the score's domain pairs only: mean over
    other domains b of the mean of d*'s and b's (so it does not pool domains the score never
    compares). Cells without a repeat are skipped and counted. Each is an `estimate` over classes;
    score["per_class"] keeps the score's per-class values (for its class-bootstrap SE)."""
    if test_domain not in circuits:
        raise KeyError(f"no circuits for test domain {test_domain!r}; have {sorted(circuits)}")
    others = [d for d in circuits if d != test_domain]
    per_class: dict[str, list[float]] = {"score": [], "floor": [], "ceiling": [], "ceiling_pairs": []}
    skipped = 0
    classes = list(circuits[test_domain])
    for k in classes:
        a = circuits[test_domain][k]
        per_class["score"].append(_mean([similarity(a, circuits[b][k]) for b in others if k in circuits[b]]))
        per_class["floor"].append(_mean([similarity(a, circuits[b][k2]) for b in others for k2 in circuits[b]
                                         if k2 != k]))
    retest: dict[tuple[str, Any], float] = {}
    for k in dict.fromkeys(k for d in circuits for k in circuits[d]):
        for d in circuits:
            if k not in circuits[d]:
                continue
            if k in repeats.get(d, {}):
                retest[d, k] = similarity(circuits[d][k], repeats[d][k])
            else:
                skipped += 1
        per_class["ceiling"].append(_mean([v for (d, k2), v in retest.items() if k2 == k]))
    for k in classes:
        per_class["ceiling_pairs"].append(_mean([(retest[test_domain, k] + retest[b, k]) / 2 for b in others
                                                 if (test_domain, k) in retest and (b, k) in retest]))
    out = {name: estimate(v) for name, v in per_class.items()}
    out["score"]["per_class"] = per_class["score"]
    out["ceiling"]["cells_skipped"] = skipped
    for name in ("ceiling", "ceiling_pairs"):
        if out[name]["mean"] is None:
            out[name]["reason"] = f"no (domain, class) cell has a second, disjoint drawing set ({skipped} skipped)"
    return out


def _mean(vals: Sequence[float]) -> float:
    return float(np.mean(vals)) if len(vals) else float("nan")


# ------------------------------------------------------------------------------ matched controls
def score_strata(values: np.ndarray, n_strata: int) -> tuple[np.ndarray, np.ndarray]:
    """(stratum per value, edges): quantile strata of `values` (n_strata bins, equal counts up to ties)."""
    if n_strata < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}")
    edges = np.quantile(values, np.linspace(0, 1, n_strata + 1))
    return np.searchsorted(edges[1:-1], values, side="right"), edges


def matched_controls(shared: Sequence[int], pool: Sequence[int], scores: Tensor | np.ndarray, n_strata: int,
                     rng: np.random.Generator) -> dict[str, Any]:
    """Controls for the `shared` nodes of one point, drawn without replacement from `pool` (disjoint
    from shared) so that every score stratum holds as many controls as shared nodes. Strata are
    `score_strata` of the `scores` [C] of shared + pool nodes; in a stratum with fewer pool than shared
    nodes, randomly chosen shared nodes are trimmed. Returns {"shared" (kept), "control", "trimmed"
    (number of shared nodes dropped), "edges"}."""
    shared, pool = np.asarray(sorted(shared), dtype=int), np.asarray(sorted(pool), dtype=int)
    if np.intersect1d(shared, pool).size:
        raise ValueError("the control pool must be disjoint from the shared nodes")
    if len(shared) == 0:
        return {"shared": [], "control": [], "trimmed": 0, "edges": []}
    s = np.asarray(scores, dtype=float)
    both = np.concatenate([shared, pool])
    strata, edges = score_strata(s[both], n_strata)
    s_str, p_str = strata[:len(shared)], strata[len(shared):]
    kept, control = [], []
    for z in np.unique(s_str):
        mine, theirs = shared[s_str == z], pool[p_str == z]
        m = min(len(mine), len(theirs))
        kept.extend(rng.choice(mine, m, replace=False).tolist())
        control.extend(rng.choice(theirs, m, replace=False).tolist())
    return {"shared": sorted(kept), "control": sorted(control), "trimmed": len(shared) - len(kept),
            "edges": edges.tolist()}


def _drop_masks(sizes: Mapping[str, int], drop: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    out = {}
    for p, n in sizes.items():
        m = torch.ones(n, dtype=torch.bool)
        m[[int(i) for i in drop.get(p, [])]] = False
        out[p] = m
    return out


def _outcomes(model, images: Tensor, labels: Tensor, head: Tensor, keep: Mapping[str, Tensor],
              fill: Mapping[str, Tensor]) -> np.ndarray:
    """[2]: mean top-1 correctness and mean true-class cosine logit of the images under `keep`."""
    logits = cosine_logits(ablated_embedding(model, images, keep, fill=fill), head).cpu()
    labels = torch.as_tensor(labels).cpu()
    return np.array([float((logits.argmax(-1) == labels).double().mean()),
                     float(logits.gather(1, labels[:, None]).double().mean())])


def matched_causal_test(model, discovery: Circuits, test_domain: str, held_out: Mapping[Any, tuple[Tensor, Tensor]],
                        head: Tensor, *, reference: Tensor, points: Sequence[str] | None = None,
                        ablation: str = "mean", n_strata: int = 4, n_draws: int = 10, seed: int = 0,
                        n_boot: int = 1000) -> dict[str, Any]:
    """De-confounded shared-node ablation (see module doc). `discovery[d][k]`: circuits found on
    discovery drawings; `held_out[k]` = (images, labels) of the test domain's class k, disjoint from
    the discovery drawings; `reference`: images whose mean the ablated nodes take. Per class, each of
    `n_draws` draws trims and matches anew; drops are averaged over draws. Returns per-class effects
    (accuracy and true-class logit: drop(shared) - drop(control)), their means with bootstrap CIs over
    classes, the trimmed fraction, skipped classes with reasons, and the logit effect's
    `causal_verdict` ("verdict": verdict, p* and its Monte-Carlo SE).
    Cost: (1 + 2 n_draws) forwards of each class's held-out images."""
    mine = discovery.get(test_domain) or {}
    if not mine:
        raise KeyError(f"no discovery circuits for test domain {test_domain!r}; have {sorted(discovery)}")
    first = next(iter(mine.values()))
    points = inner_points(first.points) if points is None else list(points)
    sizes = {p: len(first.node_scores[p]) for p in points}
    fill = ablation_values(model, reference, points, ablation)
    rng = np.random.default_rng(seed)
    per_class: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    n_shared = n_trimmed = 0
    for k, (images, labels) in held_out.items():
        if k not in mine:
            skipped[str(k)] = "no discovery circuit in the test domain"
            continue
        if len(images) == 0:
            skipped[str(k)] = "no held-out drawing"
            continue
        shared, unshared = shared_nodes(discovery, test_domain, [k], points)
        if not any(shared.values()):
            skipped[str(k)] = "no node shared with another domain"
            continue
        pool = {p: (unshared[p] | {i for k2, c in mine.items() if k2 != k for i in c.nodes[p]}) - shared[p]
                for p in points}
        base = _outcomes(model, images, labels, head, _drop_masks(sizes, {}), fill)
        drops, trimmed = [], []
        for _ in range(n_draws):
            match = {p: matched_controls(shared[p], pool[p], mine[k].node_scores[p], n_strata, rng) for p in points}
            trimmed.append(sum(m["trimmed"] for m in match.values()))
            if not any(m["shared"] for m in match.values()):
                continue
            d_sh = base - _outcomes(model, images, labels, head, _drop_masks(sizes, {p: m["shared"] for p, m in match.items()}), fill)
            d_ct = base - _outcomes(model, images, labels, head, _drop_masks(sizes, {p: m["control"] for p, m in match.items()}), fill)
            drops.append(np.stack([d_sh, d_ct]))
        total = sum(len(v) for v in shared.values())
        n_shared += total * n_draws
        n_trimmed += sum(trimmed)
        if not drops:
            skipped[str(k)] = "every stratum of its shared nodes lacked controls (all trimmed)"
            continue
        d = np.mean(drops, 0)  # [2 (shared, control), 2 (accuracy, logit)]
        per_class[str(k)] = {"n_images": len(images), "n_shared": total, "trimmed_fraction": float(np.mean(trimmed)) / total,
                             "drop_shared": d[0].tolist(), "drop_control": d[1].tolist(),
                             "effect_accuracy": float(d[0, 0] - d[1, 0]), "effect_logit": float(d[0, 1] - d[1, 1])}
    out: dict[str, Any] = {"classes": list(per_class), "skipped": skipped, "per_class": per_class,
                           "n_strata": n_strata, "n_draws": n_draws, "ablation": ablation,
                           "trimmed_fraction": n_trimmed / n_shared if n_shared else None}
    for key in ("effect_accuracy", "effect_logit"):
        out[key] = estimate([c[key] for c in per_class.values()], n_boot=n_boot, seed=seed)
    out["verdict"] = causal_verdict([c["effect_logit"] for c in per_class.values()], seed=seed)
    return out


def format_estimate(e: Mapping[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    """'+0.123 [+0.010, +0.240]' from {"mean", "ci"} (x `scale`); 'n/a' without a mean, 'no CI' without a CI."""
    if e["mean"] is None:
        return "n/a"
    ci = "no CI" if e["ci"] is None else f"[{scale * e['ci'][0]:+.{digits}f}, {scale * e['ci'][1]:+.{digits}f}]"
    return f"{scale * e['mean']:+.{digits}f} {ci}"


def causal_summary(result: Mapping[str, Any]) -> str:
    """One line on a matched causal test result (`matched_causal_test` plus "test_domain",
    "discovery_drawings", "ablation_drawings", "n_images"): drawings used, trimmed fraction, the
    paired effects on logit and accuracy with their CIs, the verdict."""
    v, tf = result["verdict"], result["trimmed_fraction"]
    p = "" if v["p_star"] is None else f", p* = {v['p_star']:.4f} ± {v['p_star_se']:.4f}"
    return (f"causal test on {result['test_domain']} C2 ({len(result['classes'])} classes, {len(result['skipped'])} "
            f"skipped): circuits discovered on {result['discovery_drawings']}, ablated on "
            f"{result['ablation_drawings']} ({result['n_images']} images); "
            f"{'n/a' if tf is None else f'{tf:.0%}'} of shared nodes trimmed (no control of similar IG score); "
            f"shared minus matched-control drop, mean over classes [95 % CI over classes]: true-class logit "
            f"{format_estimate(result['effect_logit'])}, accuracy {format_estimate(result['effect_accuracy'], 100, 1)} "
            f"points; verdict: {v['verdict']}{p}")
