"""Discovery methods on the trained quickstart models: edge-level CPR / CMD of every method under
zero, mean, resample and counterfactual ablation, and whether the cross-domain circuit overlap's
correlation with C2 accuracy changes when the paper's IG is replaced by another method (exploratory:
the analysis plan names only the paper's method).

Everything runs on the segment between the last two blocks (`analysis.planted.planted_points`:
tiny-rn layer3.0 -> layer4.0), the one the planted circuits are built on, for the first `classes`
C2 classes: CPR / CMD on the test domain's cell of each results row, the overlap on every domain's
cell (mean ablation for the methods that need one). Reads a finished quickstart directory
(results.json, runs/<run id>-<hash>/epoch_<epochs>.pt); computes nothing the quickstart stored.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from clipmech.analysis.discovery import METHODS, MethodScores, discover
from clipmech.analysis.edge_ablation import ABLATIONS, EDGE_FRACTIONS, Segment, edge_faithfulness_curve, top_edges
from clipmech.analysis.engine_adapter import true_class_logit
from clipmech.analysis.planted import planted_points
from clipmech.eval.templates import get_templates
from clipmech.data.preprocess import eval_images
from clipmech.eval.zeroshot import class_prompts_names
from clipmech.models import HookedCLIP
from clipmech.study.quickstart import QuickstartOptions, resolve_dataset

NODE_SHARE = 0.1  # nodes per point in a circuit (the paper's top 10 %)
EDGE_SHARE = 0.01  # edges of the segment in a circuit (1 %: near the paper's 3 per selected node on tiny-rn)
BOOT = 2000


@dataclasses.dataclass
class Cell:
    """A (domain, class) cell of one model: its images, donors of another class of the same domain
    (counterfactual), random test images (resample) and the domain's test images (mean reference)."""

    domain: str
    label: int
    images: torch.Tensor
    counterfactual: torch.Tensor
    resample: torch.Tensor
    reference: torch.Tensor


def _options(config: dict[str, Any]) -> QuickstartOptions:
    names = {f.name for f in dataclasses.fields(QuickstartOptions)}
    return QuickstartOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})


def _checkpoint(out: Path, run_id: str, epochs: int) -> Path:
    found = sorted(out.glob(f"runs/{run_id}-*/epoch_{epochs}.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one checkpoint runs/{run_id}-*/epoch_{epochs}.pt in {out}, found "
                                f"{len(found)}; point --quickstart at a finished quickstart directory")
    return found[0]


def _cells(ds, opts: QuickstartOptions, c2: Sequence[str], classes: int, n_images: int, seed: int,
           domains: Sequence[str] | None) -> dict[tuple[str, int], Cell]:
    test = ds.indices(split="test")
    gen = np.random.default_rng(seed)
    cells = {}
    for k in [ds.classes.index(c) for c in c2][:classes]:
        for di, d in enumerate(ds.domains):
            if domains is not None and d not in domains:
                continue
            own = test[(ds.domain_idx[test] == di) & (ds.class_idx[test] == k)][:n_images]
            other = test[(ds.domain_idx[test] == di) & (ds.class_idx[test] != k)]
            if len(own) == 0 or len(other) < len(own):
                continue
            load = lambda idx: eval_images(ds, idx, opts.image_size)  # noqa: E731
            cells[(d, k)] = Cell(d, k, load(own), load(gen.choice(other, len(own), replace=False)),
                                 load(gen.choice(test, len(own), replace=False)), load(other[:64]))
    return cells


def _segment(model, head: torch.Tensor, cell: Cell, ablation: str) -> Segment:
    upstream, downstream = planted_points(model)
    labels = torch.full((len(cell.images),), cell.label, dtype=torch.long)
    donors = {"counterfactual": cell.counterfactual, "resample": cell.resample}.get(ablation)
    return Segment.build(model, cell.images, upstream, downstream, head, labels, true_class_logit(head, labels),
                         ablation, reference=cell.reference, donors=donors)


def _scores(seg: Segment, method: str, cache: dict, **kw) -> MethodScores:
    # paper_ig and random do not depend on the ablation: computed once per cell
    key = (method, None if method in ("paper_ig", "random") else seg.ablation)
    if key not in cache:
        cache[key] = discover(seg, method, **kw)
    return cache[key]


def circuit_sets(seg: Segment, scores: MethodScores) -> tuple[set[str], set[tuple[int, int]]]:
    """(nodes, edges) of a method's circuit on the segment: the top `NODE_SHARE` of each point's
    nodes and the top `EDGE_SHARE` of its edges (for the paper's method, of the edges between its
    selected nodes)."""
    nodes = {f"{p}/{int(i)}" for p, s in scores.nodes.items()
             for i in torch.argsort(s, descending=True, stable=True)[:math.ceil(NODE_SHARE * len(s))]}
    keep = top_edges(scores.edges, 100 * EDGE_SHARE) & torch.isfinite(scores.edges)
    return nodes, {(int(i), int(j)) for j, i in torch.nonzero(keep).tolist()}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def quickstart_validity(out: str | Path, *, methods: Sequence[str] = METHODS, ablations: Sequence[str] = ABLATIONS,
                        alternative: str = "eap_ig", classes: int = 1, n_images: int = 8, steps: int = 10,
                        mask_steps: int = 100, fractions: Sequence[float] = EDGE_FRACTIONS, seed: int = 0,
                        domains: Sequence[str] | None = None) -> dict:
    """CPR / CMD rows (model, cell, ablation, method) and the overlap comparison (`overlap_change`)
    for the quickstart in `out` (`domains`: the domains whose cells enter the overlap, default all). Cost per model: len(methods) discoveries per (cell, ablation) plus
    len(fractions) + 1 edge ablations per curve; the overlap adds paper_ig and `alternative` on every
    domain's cell."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    opts = _options(results["config"])
    ds, _, c2 = resolve_dataset(opts)
    cells = _cells(ds, opts, c2, classes, n_images, seed, domains)
    templates = get_templates("auto", ds.name)[: opts.n_templates]
    rows, overlap = [], []
    for m in results["models"]:
        model = HookedCLIP.from_checkpoint(_checkpoint(out, m["run_id"], opts.epochs)).eval()
        with torch.no_grad():
            head = model.zero_shot_head(class_prompts_names(ds), templates)
        ident = {k: m[k] for k in ("model_id", "setup", "seed", "test_domain")}
        kw = {"steps": steps, "mask_steps": mask_steps, "seed": seed}
        for (d, k), cell in cells.items():
            cache: dict = {}
            for ablation in ablations if d == m["test_domain"] else ():
                seg = _segment(model, head, cell, ablation)
                for method in methods:
                    ms = _scores(seg, method, cache, **kw)
                    curve = ({"skipped": ms.note} if ms.edges is None else edge_faithfulness_curve(seg, ms.edges, fractions))
                    rows.append({**ident, "domain": d, "class": ds.classes[k], "ablation": ablation, "method": method,
                                 "seconds": ms.seconds, **curve})
            seg = _segment(model, head, cell, "mean")
            for method in ("paper_ig", alternative):
                nodes, edges = circuit_sets(seg, _scores(seg, method, cache, **kw))
                overlap.append({**ident, "domain": d, "class": ds.classes[k], "method": method,
                                "nodes": sorted(nodes), "edges": sorted(edges)})
    return {"rows": rows, "overlap": overlap_change(overlap, results["models"], alternative, seed),
            "alternative": alternative, "label": "exploratory (the analysis plan names only the paper's method)"}


def _shared_scores(overlap: list[dict], models: list[dict], method: str) -> list[tuple[float, float]]:
    """(node, edge) Jaccard of each model row's test-domain circuits with its other domains' (same
    class), averaged over domains and classes."""
    out = []
    for m in models:
        mine = [o for o in overlap if o["model_id"] == m["model_id"] and o["test_domain"] == m["test_domain"]
                and o["method"] == method]
        node, edge = [], []
        for t in (o for o in mine if o["domain"] == m["test_domain"]):
            for o in (o for o in mine if o["domain"] != t["domain"] and o["class"] == t["class"]):
                node.append(_jaccard(set(t["nodes"]), set(o["nodes"])))
                edge.append(_jaccard({tuple(e) for e in t["edges"]}, {tuple(e) for e in o["edges"]}))
        out.append((float(np.mean(node)) if node else float("nan"), float(np.mean(edge)) if edge else float("nan")))
    return out


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def overlap_change(overlap: list[dict], models: list[dict], alternative: str, seed: int = 0, boot: int = BOOT) -> dict:
    """Spearman rho of the node / edge overlap with C2 accuracy across model rows, for the paper's
    method and `alternative`, and a paired bootstrap of delta rho = rho_alt - rho_paper (model rows
    resampled together; 95 % percentile CI; `mc_error` = how far the CI bounds move between two
    bootstrap seeds; `boot` draws each). The unit is a model row; with few models the CI is wide and says so."""
    acc = np.array([m["c2_test_acc"] for m in models], dtype=float)
    paper, alt = np.array(_shared_scores(overlap, models, "paper_ig")), np.array(_shared_scores(overlap, models, alternative))
    out: dict[str, Any] = {"n_models": len(models), "c2_test_acc": acc.tolist()}
    for col, level in enumerate(("node", "edge")):
        p, a = paper[:, col], alt[:, col]
        boots = []
        for s in (seed, seed + 1):
            gen = np.random.default_rng(s)
            draws = [gen.integers(len(acc), size=len(acc)) for _ in range(boot)]
            delta = np.array([_rho(a[i], acc[i]) - _rho(p[i], acc[i]) for i in draws])
            delta = delta[np.isfinite(delta)]
            boots.append(np.percentile(delta, [2.5, 97.5]) if len(delta) else np.array([np.nan, np.nan]))
        out[level] = {"paper_ig": p.tolist(), alternative: a.tolist(), "rho_paper": _rho(p, acc), "rho_alt": _rho(a, acc),
                      "delta_rho": _rho(a, acc) - _rho(p, acc), "ci95": boots[0].tolist(),
                      "mc_error": float(np.nanmax(np.abs(boots[0] - boots[1]))) if np.isfinite(boots[0]).all() else None}
    return out
