"""Similarity of circuits across domains (docs/methods.md#circuits): node Jaccard per point, edge Jaccard, the
Weisfeiler-Lehman subtree kernel, and bootstrap confidence intervals over images.

Our own code: the WL kernel is ~30 lines here, and graph libraries (grakel, networkx) would be a
dependency for one function. Node labels are the node names ('point/index'), as in the paper; a
node's neighbourhood is its successors (out-edges) only, as in the paper's code (docs/methods.md#circuits).
`h` is the true iteration count: the paper's score named "h2" runs h = 3 (`wl_scores` with
paper_compat=True reproduces that naming).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from clipmech.analysis.activations import inner_points
from clipmech.analysis.bootstrap import bootstrap_ci, percentile_ci
from clipmech.analysis.circuits import Circuit, discover_circuit


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; raises for two empty sets (undefined, not silently 0 or NaN)."""
    union = a | b
    if not union:
        raise ValueError("Jaccard index of two empty sets is undefined")
    return len(a & b) / len(union)


def node_jaccard(a: Circuit, b: Circuit, points: Sequence[str] | None = None) -> dict[str, float]:
    """{point: Jaccard of the selected nodes of `a` and `b`} over `points` (default: common points)."""
    points = [p for p in a.points if p in b.points] if points is None else list(points)
    for p in points:
        if p not in a.nodes or p not in b.nodes:
            raise KeyError(f"point {p!r} is not in both circuits")
    return {p: jaccard(set(a.nodes[p]), set(b.nodes[p])) for p in points}


def mean_node_jaccard(a: Circuit, b: Circuit, points: Sequence[str] | None = None) -> float:
    """The study's node similarity of two circuits: `node_jaccard` averaged over `points` (default:
    their common points except the input, docs/methods.md#circuits). Every analysis path uses this one."""
    points = inner_points([p for p in a.points if p in b.points]) if points is None else points
    return float(np.mean(list(node_jaccard(a, b, points).values())))


def edge_jaccard(a: Circuit, b: Circuit) -> float:
    """Jaccard of the edge sets: an edge is shared only if both circuits kept it (same endpoints)."""
    return jaccard(a.edge_set(), b.edge_set())


def _wl_features(circuit: Circuit, h: int, table: dict) -> Counter:
    """Counts of WL labels of iterations 0..h; `table` compresses labels consistently across graphs."""
    nodes = sorted(circuit.node_set())
    outs = {n: [] for n in nodes}
    for src, dst in circuit.edge_set():
        if src in outs and dst in outs:
            outs[src].append(dst)
    labels = {n: table.setdefault(("node", n), len(table)) for n in nodes}
    feats = Counter(labels.values())
    for _ in range(h):
        # the paper's relabelling: own label + sorted multiset of the successors' labels; one table
        # for all iterations equals a fresh table per iteration (keys of different rounds never meet)
        labels = {n: table.setdefault((labels[n], tuple(sorted(labels[m] for m in outs[n]))), len(table))
                  for n in nodes}
        feats.update(labels.values())
    return feats


def wl_kernel(a: Circuit, b: Circuit, h: int = 2, normalize: bool = True) -> float:
    """Weisfeiler-Lehman subtree kernel on the directed graphs (successors only) with `h`
    refinement iterations (h = 0: node-label overlap), node names as initial labels:
    k = <phi_a, phi_b> with phi the label counts of iterations 0..h. `normalize` divides by
    sqrt(k(a,a) k(b,b)), giving [0, 1]."""
    if h < 0:
        raise ValueError(f"WL iterations h must be >= 0, got {h}")
    table: dict = {}
    fa, fb = _wl_features(a, h, table), _wl_features(b, h, table)
    k = float(sum(v * fb[key] for key, v in fa.items()))
    if not normalize:
        return k
    norm = math.sqrt(sum(v * v for v in fa.values()) * sum(v * v for v in fb.values()))
    if norm == 0:
        raise ValueError("WL kernel of an empty circuit is undefined")
    return k / norm


# The paper's script names its WL scores by a flag whose "h2" runs 3 iterations
# (docs/methods.md#paper-code-quirks).
PAPER_WL_ITERATIONS = {1: 1, 2: 3, 3: 3}


def wl_iterations(name: int, paper_compat: bool = False) -> int:
    """Iterations run for the score named wl_h{name}: `name` itself, or the paper's (h2 -> 3)."""
    return PAPER_WL_ITERATIONS.get(name, name) if paper_compat else name


def wl_scores(a: Circuit, b: Circuit, names: Sequence[int] = (1, 2, 3), paper_compat: bool = False) -> dict[str, float]:
    """{f"wl_h{n}": normalised WL kernel} for the named iteration counts (see `wl_iterations`)."""
    return {f"wl_h{n}": wl_kernel(a, b, wl_iterations(n, paper_compat)) for n in names}


def circuit_similarities(a: Circuit, b: Circuit, wl_h: Sequence[int] = (1, 2, 3),
                         paper_compat: bool = False) -> dict[str, Any]:
    """All similarities of two circuits: per-point node Jaccard, their mean, edge Jaccard, WL(h)
    (`wl_scores`; paper_compat: the paper's WL naming)."""
    nodes = node_jaccard(a, b)
    out: dict[str, Any] = {"node_jaccard": nodes, "node_jaccard_mean": float(np.mean(list(nodes.values()))),
                           "edge_jaccard": edge_jaccard(a, b)}
    out.update(wl_scores(a, b, wl_h, paper_compat))
    return out


def bootstrap_circuit_similarity(model, images_a: Tensor, labels_a: Tensor, images_b: Tensor, labels_b: Tensor,
                                 head: Tensor, similarity: Callable[[Circuit, Circuit], float] = edge_jaccard, *,
                                 n_boot: int = 20, seed: int = 0, alpha: float = 0.05,
                                 **discover_kwargs: Any) -> dict[str, Any]:
    """Similarity of the circuits of two image sets (e.g. one class in two domains) with a bootstrap
    CI over images: each replicate resamples both sets with replacement and rediscovers both
    circuits. Returns {estimate, ci, samples}. Cost: 2 * (n_boot + 1) `discover_circuit` calls."""
    est = similarity(discover_circuit(model, images_a, labels_a, head, **discover_kwargs),
                     discover_circuit(model, images_b, labels_b, head, **discover_kwargs))
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_boot):
        ia = torch.randint(len(images_a), (len(images_a),), generator=gen)
        ib = torch.randint(len(images_b), (len(images_b),), generator=gen)
        samples.append(similarity(discover_circuit(model, images_a[ia], labels_a[ia], head, **discover_kwargs),
                                  discover_circuit(model, images_b[ib], labels_b[ib], head, **discover_kwargs)))
    return {"estimate": float(est), "ci": list(percentile_ci(samples, 1 - alpha)), "samples": samples}


def mean_with_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Mean of per-class values with a percentile bootstrap CI over classes (`bootstrap_ci`; None
    with fewer than two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("no values to average")
    ci = bootstrap_ci(v, n_boot=n_boot, level=1 - alpha, seed=seed)
    return {"mean": float(v.mean()), "ci": None if ci is None else list(ci), "n": int(len(v))}


def domain_similarity(circuits: Mapping[str, Mapping[str, Circuit]], domains: Sequence[str],
                      subsets: Mapping[str, Sequence[str]], points: Sequence[str],
                      paper_compat: bool = False) -> dict[str, Any]:
    """Domain x domain circuit similarity, averaged over classes. `circuits` {domain: {class: Circuit}};
    `subsets` {name: classes} (e.g. all / C2 / C1). For node_jaccard (over `points`), edge_jaccard and
    wl_h2: {subset: {"mean": [D, D], "ci95_over_classes": [D][D] (percentile bootstrap over the
    classes both domains hold, `mean_with_ci`; None for one class)}}, plus "mean" / "ci95_over_classes"
    of the first subset at the top level, and "node_jaccard_per_point" {point: [D, D]} over the first
    subset's classes. A cell no class reaches is NaN. Cost: D^2 x classes similarity calls."""
    measures = {"node_jaccard": lambda a, b: mean_node_jaccard(a, b, points), "edge_jaccard": edge_jaccard,
                "wl_h2": lambda a, b: wl_scores(a, b, (2,), paper_compat)["wl_h2"]}
    first = next(iter(subsets))
    out: dict[str, Any] = {}
    for name, fn in measures.items():
        out[name] = {}
        for subset, ks in subsets.items():
            mean = np.full((len(domains), len(domains)), np.nan)
            cis = [[None] * len(domains) for _ in domains]
            for i, a in enumerate(domains):
                for j, b in enumerate(domains):
                    vals = [fn(circuits[a][k], circuits[b][k]) for k in ks if k in circuits[a] and k in circuits[b]]
                    if vals:
                        res = mean_with_ci(vals)
                        mean[i, j], cis[i][j] = res["mean"], res["ci"]
            if subset == first:
                out[name].update(mean=mean.tolist(), ci95_over_classes=cis)
            out[name][subset] = {"mean": mean.tolist(), "ci95_over_classes": cis}
    ks = subsets[first]
    out["node_jaccard_per_point"] = {
        p: [[float(np.mean([node_jaccard(circuits[a][k], circuits[b][k], [p])[p] for k in ks
                            if k in circuits[a] and k in circuits[b]] or [np.nan])) for b in domains] for a in domains]
        for p in points}
    return out
