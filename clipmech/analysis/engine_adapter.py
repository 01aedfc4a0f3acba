"""The one adapter between the discovery-method comparison (`clipmech.analysis.planted`,
`discovery`, `edge_ablation`, `clipmech.study.circuit_validity`) and clipmech's attribution engine
(`clipmech.analysis.circuits`, `clipmech.analysis.patching`): every name those modules use from the
engine is imported here and only here, so moving the engine (or changing its metric signature)
changes only this file."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from clipmech.analysis.circuits import Circuit, ablation_values, curve_areas, ig_edge_scores, ig_node_scores
from clipmech.analysis.patching import (Metric, cache_points, check_points, evaluate_metric, node_dim, riemann_alphas,
                                        segment_fn, true_class_logit)

__all__ = ["Circuit", "Metric", "ablation_values", "cache_points", "check_points", "curve_areas", "evaluate_metric", "node_dim", "paper_ig_scores",
           "riemann_alphas", "segment_fn", "true_class_logit"]


def paper_ig_scores(model, images: Tensor, labels: Tensor, head: Tensor, upstream: str, downstream: str, *,
                    steps: int = 10, node_fraction: float = 0.1) -> tuple[dict[str, Tensor], Tensor]:
    """The paper's node and edge scores on the consecutive points upstream -> downstream: node IG
    (zero baseline, true-class cosine logit) at both points, and edge IG between the top
    ceil(node_fraction * C) nodes of each point; edges outside those pairs score -inf (the paper's
    method ranks only edges between its selected nodes). Returns ({point: [C]}, edges [J, I]).
    Cost: two node IGs and one edge IG over the selected nodes (`circuits.discover_circuit`)."""
    nodes = {p: ig_node_scores(model, images, labels, head, p, steps) for p in (upstream, downstream)}
    sel = {p: torch.argsort(s, descending=True, stable=True)[:math.ceil(node_fraction * len(s))] for p, s in nodes.items()}
    edges = torch.full((len(nodes[downstream]), len(nodes[upstream])), -torch.inf, dtype=nodes[upstream].dtype)
    scores = ig_edge_scores(model, images, upstream, downstream, sel[downstream].tolist(), steps,
                            upstream_nodes=sel[upstream].tolist())
    edges[sel[downstream][:, None], sel[upstream][None]] = scores.to(edges)
    return nodes, edges
