"""Explanations of a model's circuit nodes, one unit of a study: which nodes (shared with another
domain's circuit, or the test domain's only), their text labels, per-domain numbers, top examples
with thumbnails, `explanations.json` (docs/explain.md) and the `nodes_<group>.png` figures.

Inputs are explicit (a model, circuits, image tensors), so `clipmech analyze explain`, the
quickstart and the per-run plan call the same functions; the primitives are in
`clipmech.analysis.explain`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from matplotlib.figure import Figure

from clipmech.analysis import explain as X
from clipmech.analysis import saliency as S
from clipmech.analysis.ablation import ablation_values
from clipmech.analysis.attribution import cache_points
from clipmech.analysis.circuit import shared_nodes, short_point
from clipmech.data.preprocess import denormalize
from clipmech.utils import PathLike, atomic_write_bytes, atomic_write_json, save_figure

FORMAT = "clipmech.explanations/1"
PER_FIGURE = 5  # nodes per figure: the report shows the top 5 of each group
Node = tuple[str, int, str, float | None]  # (point, index, group, mean IG score)


@dataclass
class ImageSet:
    """Normalised images [N, 3, S, S] with, per image, its domain index and optionally its label
    (a row of the zero-shot head), source key and class name."""
    images: Tensor
    domain_idx: np.ndarray
    labels: Tensor | None = None
    sources: Sequence[str] | None = None
    classes: Sequence[str] | None = None


def select_circuit_nodes(circuits: Mapping[str, Mapping[str, Any]], test_domain: str, classes: Sequence[str],
                         limit: int) -> tuple[list[Node], dict[str, Any]]:
    """Nodes of the test domain's circuits of `classes` (`circuits[domain][class]`, Circuit objects)
    that another domain's circuit of the same class also holds ('shared'), then the test domain's
    own ('test_domain_only'), each group by the node's mean share of its point's IG score
    (`explain.shared_ranking`), at most `limit` per group; the
    pixel input is left out. Returns (nodes, counts)."""
    mine = {k: circuits[test_domain][k] for k in classes}
    points = [p for p in next(iter(mine.values())).points if not p.endswith("hook_input")]
    shared, own = shared_nodes(circuits, test_domain, classes, points)
    picked: list[Node] = []
    for group, nodes in (("shared", shared), ("test_domain_only", own)):
        for p, n in X.shared_ranking(nodes, mine, limit):
            picked.append((p, n, group, float(np.mean([float(c.node_scores[p][n]) for c in mine.values()]))))
    return picked, {"test_domain": test_domain, "classes": list(classes), "domains": sorted(circuits),
                    "n_shared": sum(map(len, shared.values())), "n_test_domain_only": sum(map(len, own.values()))}


def explain_nodes(model, nodes: Sequence[Node], sample: ImageSet, head: Tensor, pool: ImageSet,
                  domains: Sequence[str], words: Sequence[str], word_embeddings: Tensor, out: Path, *,
                  method: str = "auto", k: int = X.N_LABELS, top: int = 3,
                  meta: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Explain each node on `sample` (labels into `head`), its top-`top` examples per domain among
    `pool`; write out/explanations.json, out/thumbs/*.png and out/nodes_<group>.png. Returns
    (the document, the figure paths). Cost per node: one segment forward over the sample for the
    effects, one forward over the pool for the activations."""
    points = list(dict.fromkeys(p for p, *_ in nodes))
    fills = ablation_values(model, sample.images, points)
    results = []
    for p, i, group, score in nodes:
        res = X.explain_node(model, sample.images, sample.labels, sample.domain_idx, domains, head, p, i, fills[p],
                             word_embeddings, words, method=method, k=k)
        res.update(group=group, ig_score=score, top_examples=top_example_entries(model, pool, p, i, top, domains, out))
        results.append(res)
    info = {"n_images": len(sample.images), "ablation": "mean over the images",
            "effect": "change of the L2-normalised image embedding when the node is mean-ablated"}
    doc = {"format": FORMAT, "meta": {**(meta or {}), **info}, "nodes": results}
    atomic_write_json(doc, out / "explanations.json")
    return doc, draw_node_figures(doc, out, domains)


def top_example_entries(model, pool: ImageSet, point: str, index: int, k: int, domains: Sequence[str],
                        out: Path) -> dict[str, list[dict]]:
    """Top-k images of `pool` per domain by the node's mean activation, each written to out/thumbs/
    with the node's activation map on top (spatial points)."""
    acts = torch.cat([X.node_activations(model, pool.images[j:j + 64], point, [index])[:, 0]
                      for j in range(0, len(pool.images), 64)]).cpu().numpy()
    result = {}
    for d, picks in X.top_examples(acts, pool.domain_idx, k).items():
        images = pool.images[picks]
        a = cache_points(model, images, [point])[point]
        heat = (S.upsample(S.position_map(a, point, [index]), model.image_size).cpu().numpy()
                if S.grid_of(a.shape, point) is not None else None)
        entries = []
        for j, (row, img) in enumerate(zip(picks, images)):
            name = f"thumbs/{point.replace('.', '_')}_{index}_{domains[d]}_{j}.png"
            write_image(overlay(img, heat[j]) if heat is not None else thumbnail(img), out / name)
            entry = {"row": int(row), "activation": float(acts[row]), "thumbnail": name}
            if pool.sources is not None:
                entry["source"] = pool.sources[row]
            if pool.classes is not None:
                entry["class"] = pool.classes[row]
            entries.append(entry)
        result[domains[d]] = entries
    return result


def draw_node_figures(doc: Mapping[str, Any], folder: Path, domains: Sequence[str],
                      per_figure: int = PER_FIGURE) -> list[Path]:
    """nodes_<group>.png per node group of an explanations document (its first `per_figure` nodes,
    the top example per domain from folder/thumbs)."""
    from PIL import Image

    paths = []
    td = doc["meta"].get("test_domain")
    for group in dict.fromkeys(r["group"] for r in doc["nodes"]):
        picked = [r for r in doc["nodes"] if r["group"] == group][:per_figure]
        thumbs = {r["node"]: {d: np.asarray(Image.open(folder / ex[0]["thumbnail"]).convert("RGB"))
                              for d, ex in r["top_examples"].items() if ex} for r in picked}
        title = {"shared": f"nodes of the {td} C2 circuits shared with another domain",
                 "test_domain_only": f"nodes of the {td} C2 circuits found in {td} only"}.get(group, "requested nodes")
        paths.append(node_explanations(picked, thumbs, domains, folder / f"nodes_{group}.png",
                                       title=title + ": labels (share of effect explained), top examples"))
    return paths


# ---------------------------------------------------------------------------------------- images
def thumbnail(image: Tensor) -> np.ndarray:
    """uint8 [S, S, 3] of a normalised image tensor [3, S, S] (OpenAI normalisation undone)."""
    rgb = denormalize(image)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: Tensor, heat: np.ndarray) -> np.ndarray:
    """The image with a heat map [S, S] on top (its positive part scaled to its max, 'inferno')."""
    from matplotlib import colormaps

    base = thumbnail(image).astype(np.float32)
    h = np.clip(np.asarray(heat, dtype=np.float32), 0, None)
    h = h / h.max() if h.max() > 0 else h
    colour = colormaps["inferno"](h)[..., :3] * 255
    alpha = 0.25 + 0.5 * h[..., None]
    return (base * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def write_image(pixels: np.ndarray, path: Path, min_height: int = 128) -> Path:
    """uint8 [H, W, 3] -> PNG at `path`, atomically; pixels repeated (nearest neighbour) to at least
    `min_height` rows, so 32 px model inputs stay legible."""
    from PIL import Image

    factor = -(-min_height // pixels.shape[0])
    pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return atomic_write_bytes(buf.getvalue(), path)


def node_explanations(nodes: Sequence[Mapping], thumbnails: Mapping[str, Mapping[str, np.ndarray]],
                      domains: Sequence[str], path: PathLike, title: str = "") -> Path:
    """One row per node: its name, its labels with the fraction of its effect each explains (chance
    and ceiling beside them), then per domain its top example (uint8 [S, S, 3], overlaid by the
    node's activation map) with the node's mean activation / ablation effect there. `nodes` are
    entries of explanations.json (docs/explain.md); `thumbnails[node][domain]` the pictures."""
    if not nodes:
        raise ValueError("no nodes to draw; explain some first (clipmech analyze explain)")
    cols = 1 + len(domains)
    fig = Figure(figsize=(2.6 + 1.25 * len(domains), 1.35 * len(nodes) + 0.5))
    axes = fig.subplots(len(nodes), cols, squeeze=False, gridspec_kw={"width_ratios": [2.4] + [1] * len(domains)})
    for r, node in enumerate(nodes):
        text = [short_point(node["point"]) + f"/{node['index']}"]
        text += [f"{x['word'][:18]}: {x['fraction']:.0%}" for x in node["labels"]]
        text.append(f"chance {node['chance']:.0%}, ceiling {node['ceiling']:.0%}")
        axes[r, 0].text(0, 0.5, "\n".join(text), va="center", fontsize=7, family="monospace")
        axes[r, 0].axis("off")
        for c, d in enumerate(domains, start=1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = thumbnails.get(node["node"], {}).get(d)
            if img is not None:
                ax.imshow(img)
            stats_d = node["domains"].get(d)
            if stats_d is not None:
                ax.set_xlabel(f"act {stats_d['mean_activation']:.2g}\nabl {stats_d['ablation_effect']:+.2g}", fontsize=7)
            if r == 0:
                ax.set_title(d, fontsize=8)
    fig.suptitle(title or "circuit nodes: labels (share of the node's effect explained) and top examples", fontsize=9)
    return save_figure(fig, path, 130)
