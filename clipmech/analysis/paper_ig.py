"""The one adapter between the discovery-method comparison (`clipmech.analysis.discovery`,
`clipmech.analysis.edge_ablation`) and the paper's IG circuit engine (`clipmech.analysis.circuits`):
every call into that engine goes through this module, so moving the engine changes only the imports
here."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from clipmech.analysis.circuits import curve_areas, ig_edge_scores, ig_node_scores

__all__ = ["curve_areas", "paper_ig_scores"]


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
