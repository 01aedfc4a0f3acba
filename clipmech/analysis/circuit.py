"""The `Circuit` type and its discovery: channel-, head-, neuron- and SAE-latent-level circuits of
CLIP's image tower (paper §8.4), found from the attribution engine's node and edge scores
(`clipmech.analysis.attribution`), and the shared / unshared node sets of the causal test.
Ablating a circuit and its faithfulness are in `clipmech.analysis.ablation`; graph similarity in
`clipmech.analysis.circuit_similarity`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from clipmech.analysis.attribution import (RIEMANN_RULE, check_points, component_points, ig_edge_scores_in,
                                           ig_node_scores_grouped, ig_node_scores_in, node_spaces)
from clipmech.analysis.metrics import Metric
from clipmech.utils import atomic_torch_save, atomic_write_json, save_figure, warn_renamed

__all__ = ["Circuit", "component_points", "discover_circuit", "discover_circuits", "node_name", "shared_nodes"]


def node_name(point: str, index: int) -> str:
    """The paper's node id 'point/index'."""
    return f"{point}/{index}"


@dataclass
class Circuit:
    """A layered circuit: `points` in order; per point, `node_scores` [C] and the selected `nodes`
    (indices, best first); `edges` (upstream point, upstream node, downstream point, downstream
    node, signed score) between consecutive points; free-form `meta` (domain, class, model...)."""

    points: list[str]
    node_scores: dict[str, Tensor]
    nodes: dict[str, list[int]]
    edges: list[tuple[str, int, str, int, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def node_set(self, point: str | None = None) -> set[str]:
        """Node names ('point/index'), of one point or of all points."""
        pts = self.points if point is None else [point]
        return {node_name(p, i) for p in pts for i in self.nodes[p]}

    def edge_set(self) -> set[tuple[str, str]]:
        return {(node_name(u, i), node_name(d, j)) for u, i, d, j, _ in self.edges}

    def keep_masks(self) -> dict[str, Tensor]:
        """{point: bool [C]} True on circuit nodes."""
        out = {}
        for p in self.points:
            mask = torch.zeros(len(self.node_scores[p]), dtype=torch.bool)
            mask[self.nodes[p]] = True
            out[p] = mask
        return out

    def save(self, path: str | Path) -> Path:
        """Write `path`.json (points, nodes, edges, meta) and `path`.pt (node scores), atomically."""
        path = Path(path).with_suffix("")
        atomic_torch_save({p: s.detach().cpu() for p, s in self.node_scores.items()}, path.with_suffix(".pt"))
        atomic_write_json({"format": "clipmech.circuit/1", "points": self.points, "nodes": self.nodes,
                           "edges": [list(e) for e in self.edges], "meta": self.meta}, path.with_suffix(".json"))
        return path.with_suffix(".json")

    @classmethod
    def load_matching(cls, path: str | Path, meta: Mapping[str, Any]) -> "Circuit | None":
        """The circuit saved at `path` when both its files exist and its meta equals `meta` on every
        key of `meta` (the settings it was discovered with), else None: a cache check."""
        path = Path(path).with_suffix("")
        if not (path.with_suffix(".json").exists() and path.with_suffix(".pt").exists()):
            return None
        c = cls.load(path)
        return c if all(c.meta.get(key) == v for key, v in meta.items()) else None

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        path = Path(path).with_suffix("")
        for p in (path.with_suffix(".json"), path.with_suffix(".pt")):
            if not p.exists():
                raise FileNotFoundError(f"circuit file {p} is missing; write circuits with Circuit.save(path)")
        data = json.loads(path.with_suffix(".json").read_text())
        if data.get("format") != "clipmech.circuit/1":
            raise ValueError(f"{path.with_suffix('.json')} is not a clipmech circuit file")
        scores = torch.load(path.with_suffix(".pt"), map_location="cpu", weights_only=True)
        edges = [(u, int(i), d, int(j), float(w)) for u, i, d, j, w in data["edges"]]
        return cls(list(data["points"]), scores, {p: list(v) for p, v in data["nodes"].items()}, edges, data["meta"])

    def draw(self, path: str | Path | None = None, ax=None, max_nodes: int = 40):
        """Layered drawing: one column per point, selected nodes (at most `max_nodes` per column,
        best on top), edges coloured by sign (red +, blue -) with opacity ~ |score|. Draws into `ax`
        (a matplotlib Axes) or a new Figure built without pyplot (no backend is chosen); writes a
        PNG atomically when `path` is given. Returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        if ax is None:
            ax = Figure(figsize=(max(6, 0.9 * len(self.points)), 6), layout="constrained").subplots()
        pos = {}
        for x, p in enumerate(self.points):
            shown = self.nodes[p][:max_nodes]
            for r, i in enumerate(shown):
                pos[node_name(p, i)] = (x, 1 - (r + 0.5) / max(len(shown), 1))
        wmax = max((abs(w) for *_, w in self.edges), default=1.0) or 1.0
        for u, i, d, j, w in self.edges:
            a, b = pos.get(node_name(u, i)), pos.get(node_name(d, j))
            if a and b:
                ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:red" if w >= 0 else "tab:blue",
                        alpha=0.15 + 0.85 * abs(w) / wmax, lw=0.8)
        xs, ys = zip(*pos.values()) if pos else ((), ())
        ax.scatter(xs, ys, s=12, color="black", zorder=3)
        ax.set_xticks(range(len(self.points)))
        ax.set_xticklabels([short_point(p) for p in self.points], rotation=60, ha="right", fontsize=7)
        ax.set_yticks([])
        title = " / ".join(str(self.meta[k]) for k in ("domain", "class") if k in self.meta)
        ax.set_title(f"circuit {title}".strip())
        if path is not None:
            save_figure(ax.figure, path, dpi=120)
        return ax.figure


def short_point(point: str) -> str:
    """'visual.layer2.0.hook_out' -> 'layer2.0': a hook point's name as figure labels show it."""
    return point.removeprefix("visual.").replace(".hook_out", "").replace("hook_", "")


def discover_circuit(model, images: Tensor, labels: Tensor | None, head: Tensor | None, *,
                     points: Sequence[str] | None = None, node_fraction: float = 0.1, edges: bool = True,
                     top_k: int = 3, steps: int = 10, metric: Metric | None = None, rule: str = RIEMANN_RULE,
                     saes: Mapping[str, Any] | None = None, strategy: str | None = None, calibrate: bool = False,
                     meta: dict[str, Any] | None = None) -> Circuit:
    """The paper's circuit for one (domain, class) batch: per point the top ceil(node_fraction·C)
    nodes by `ig_node_scores` (`metric` and `rule` as there; default the summed true-class logit
    of `labels` under `head`); with `edges`, for each consecutive pair (u, d) and each selected
    downstream node, the `top_k` selected upstream nodes by SIGNED edge score. Pairs are only
    (points[i], points[i+1]); no wrap-around from the last point to the first (paper §12).

    `points` default to model.analysis_points(); `component_points(model)` gives ViT heads and MLP
    neurons; `saes` {point: sae} makes that point's nodes SAE latents; `strategy` / `calibrate` as in
    `ig_edge_scores` (a forced 'split' needs every pair to be one ResNet bottleneck; the cost model
    picks it wherever it applies). Cost: len(points) node IGs plus one edge IG per pair over the
    selected nodes only (one segment forward, then a VJP per selected downstream node, a JVP per
    selected upstream node or the bottleneck split, whichever the cost model finds cheapest).
    `edges=False`: nodes only, no edge IG (about half the cost on tiny-rn; what node ablations
    need); `top_k=0`, its former spelling, is deprecated. Many small batches: `discover_circuits`.
    """
    points, edges = _circuit_args(model, points, node_fraction, edges, top_k)
    spaces = node_spaces(model, images, points, saes)
    scores = {p: ig_node_scores_in(model, images, labels, head, spaces[p], steps, metric=metric, rule=rule)
              for p in points}
    info = {"saes": sorted(saes or {})}
    if metric is not None:
        info["metric"] = getattr(metric, "__qualname__", type(metric).__name__)
    return _assemble(model, images, spaces, scores, node_fraction, edges, top_k, steps, rule, strategy, calibrate,
                     {**info, **(meta or {})})


def discover_circuits(model, batches: Sequence[tuple[Tensor, Tensor]], head: Tensor, *,
                      points: Sequence[str] | None = None, node_fraction: float = 0.1, edges: bool = True,
                      top_k: int = 3, steps: int = 10, rule: str = RIEMANN_RULE, strategy: str | None = None,
                      calibrate: bool = False, metas: Sequence[dict[str, Any] | None] | None = None,
                      max_images: int = 64) -> list[Circuit]:
    """`discover_circuit` (default metric, no SAE) of each (images, labels) batch, with the node IG of
    all batches run together (`ig_node_scores_grouped`: the same scores up to float summation
    order), `max_images` images per forward + backward. Edges stay one IG per batch and pair, as
    they depend on the batch's own nodes. For the study's many one- or two-image (domain, class)
    cells this is ~2-3x faster than a loop over `discover_circuit`."""
    points, edges = _circuit_args(model, points, node_fraction, edges, top_k)
    metas = list(metas) if metas is not None else [None] * len(batches)
    if len(metas) != len(batches):
        raise ValueError(f"{len(metas)} metas for {len(batches)} batches")
    if not batches:
        return []
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([torch.as_tensor(b[1]).long() for b in batches])
    bounds = torch.cumsum(torch.tensor([0] + [len(b[0]) for b in batches]), 0).tolist()
    groups = [range(bounds[i], bounds[i + 1]) for i in range(len(batches))]
    spaces = node_spaces(model, images, points)
    scores = {p: ig_node_scores_grouped(model, images, labels, head, spaces[p], steps, groups, rule=rule,
                                        max_images=max_images) for p in points}
    out = []
    for i, (rows, meta) in enumerate(zip(groups, metas)):
        out.append(_assemble(model, batches[i][0], {p: s.select(rows) for p, s in spaces.items()},
                             {p: scores[p][i] for p in points}, node_fraction, edges, top_k, steps, rule, strategy,
                             calibrate, {"saes": [], **(meta or {})}))
    return out


def _circuit_args(model, points: Sequence[str] | None, node_fraction: float, edges: bool, top_k: int
                  ) -> tuple[list[str], bool]:
    """(points, edges) after checking `discover_circuit`'s arguments."""
    if top_k == 0:
        warn_renamed("discover_circuit(top_k=0)", "edges=False")
        edges = False
    if top_k < 0:
        raise ValueError(f"top_k must be >= 1 edge per node (edges=False: nodes only), got {top_k}")
    points = list(model.analysis_points() if points is None else points)
    check_points(model, points)
    order = list(model.hook_names())
    if [order.index(p) for p in points] != sorted(order.index(p) for p in points) or len(set(points)) != len(points):
        raise ValueError(f"circuit points must be distinct and in forward order; got {points}")
    if not 0 < node_fraction <= 1:
        raise ValueError(f"node_fraction must be in (0, 1], got {node_fraction}")
    return points, edges


def _assemble(model, images: Tensor, spaces: Mapping[str, Any], scores: Mapping[str, Tensor], node_fraction: float,
              edges: bool, top_k: int, steps: int, rule: str, strategy: str | None, calibrate: bool,
              extra: dict[str, Any]) -> Circuit:
    """The circuit from node scores: top nodes per point, then (with `edges`) the edge IG per pair;
    its meta holds the discovery settings, then `extra` (SAEs, metric, the caller's meta)."""
    points = list(scores)
    nodes = {}
    for p in points:
        k = math.ceil(node_fraction * len(scores[p]))
        nodes[p] = [int(i) for i in torch.argsort(scores[p], descending=True, stable=True)[:k]]
    found = []
    for u, d in zip(points[:-1], points[1:]) if edges else ():
        mat = ig_edge_scores_in(model, images, spaces[u], spaces[d], nodes[d], steps, nodes[u], strategy, calibrate,
                                rule)
        for row, j in zip(mat, nodes[d]):
            for col in torch.argsort(row, descending=True, stable=True)[:top_k]:
                found.append((u, nodes[u][int(col)], d, j, float(row[col])))
    # top_k 0 marks a nodes-only circuit in its meta, as circuit files written before `edges` do.
    info = {"n_images": len(images), "steps": steps, "node_fraction": node_fraction, "top_k": top_k if edges else 0}
    if rule != RIEMANN_RULE:
        info["rule"] = rule
    return Circuit(points, {p: s.cpu() for p, s in scores.items()}, nodes, found, {**info, **extra})


# ----------------------------------------------------------------------------- shared nodes
def shared_nodes(circuits: Mapping[str, Mapping[str, Circuit]], test_domain: str, classes: Sequence[str],
                 points: Sequence[str]) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Per point, nodes of the test domain's circuits (over `classes`) that also occur in the same
    class's circuit of some other domain (shared), and the rest (unshared, disjoint from shared).
    `circuits[domain][class]`."""
    if test_domain not in circuits:
        raise KeyError(f"no circuits for test domain {test_domain!r}; have {sorted(circuits)}")
    others = [d for d in circuits if d != test_domain]
    if not others:
        raise ValueError("the shared-node test needs circuits of at least one domain besides the test domain")
    shared = {p: set() for p in points}
    mine = {p: set() for p in points}
    for k in classes:
        if k not in circuits[test_domain]:
            raise KeyError(f"no circuit of class {k!r} for test domain {test_domain!r}")
        for p in points:
            own = set(circuits[test_domain][k].nodes[p])
            other = set().union(*(circuits[d][k].nodes[p] for d in others if k in circuits[d]))
            mine[p] |= own
            shared[p] |= own & other
    return shared, {p: mine[p] - shared[p] for p in points}
