"""Node explanations: what a circuit node carries, in words (text labels) and in examples.

A node (`point/index`: a channel, a head, a neuron, an SAE latent) is described by the change it
makes to the L2-normalised image embedding, projected onto text embeddings of a vocabulary:

- **total effect** (every node): E_b = normalize(emb(a_b)) - normalize(emb(a_b with the node set to
  its mean over reference images)), one segment forward per node. Most circuit nodes sit in
  layer1-3 and reach the embedding only through later layers; this is the effect they have.
- **direct effect** (nodes with a linear path to the embedding: ViT heads `attn.hook_z` and MLP
  neurons `mlp.hook_post`, ResNet attention-pool heads `attnpool.hook_z` and embedding channels
  `attnpool.hook_out`): the node's own write to the pooled stream, read out with the final
  LayerNorm's scale frozen at its clean value and linearised through the normalisation.
- **TextSpan** (ViT heads, Gandelsman et al., ICLR 2024): the direct effects, centred over images,
  explained by a greedy text basis.

Labels come from one greedy rule (`text_span`): pick the word direction along which the effects have
the most (centred or uncentred) energy, record the share of the total it explains, project that
direction out of the effects and of every word, repeat. A label's `fraction` is that share; beside the
labels stand the chance level (k random directions explain k/D) and the ceiling (the top k
principal directions, the most any k directions can explain). Words are the normalised
template-averaged text embeddings, uncentred: the direction all prompts share is a legitimate first
label and is projected out of every word before the second is chosen. A label's `logit_effect` is
the mean change of the cosine between image and word embedding the node
makes (positive: the node pushes the image toward the word).

Per domain a node also gets its mean activation and its ablation effect on the true-class logit
(-mean_b E_b . class_b); `top_examples` picks the images that drive it most.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipmech.analysis.circuits import NodeSpace
from clipmech.analysis.patching import cache_points, check_points, segment_fn

N_LABELS = 3  # labels per node: on the tiny emoji models the 4th explained < 5 % of the total effect
METHODS = ("auto", "textspan", "direct", "total")


# ------------------------------------------------------------------------------------ nodes
def parse_node(model, name: str) -> tuple[str, int]:
    """'point/index' -> (point, index), checked against the model: an unknown point raises KeyError
    with the closest names, an index past the point's nodes a ValueError naming the range."""
    point, sep, index = name.rpartition("/")
    if not sep or not index.isdigit():
        raise ValueError(f"node {name!r} must be written POINT/INDEX, e.g. visual.layer3.0.hook_out/17")
    check_points(model, [point])
    n = node_count(model, point)
    if int(index) >= n:
        raise ValueError(f"node {name!r} does not exist: {point} has {n} nodes (0..{n - 1})")
    return point, int(index)


def node_count(model, point: str) -> int:
    """Number of nodes (channels, heads, dimensions) at `point`; one probe forward."""
    probe = torch.zeros(1, 3, model.image_size, model.image_size, dtype=next(model.parameters()).dtype,
                        device=next(model.parameters()).device)
    act = cache_points(model, probe, [point])[point]
    return NodeSpace(point, act).n_nodes


# ------------------------------------------------------------------------------------ effects
def total_effects(model, images: Tensor, point: str, nodes: Sequence[int], fill: Tensor, *, sae: Any = None,
                  batch_nodes: int = 8) -> Tensor:
    """[len(nodes), B, D]: normalize(emb clean) - normalize(emb with node n at `fill[n]`), per image.
    `fill` holds one example's node values [..., C] (`circuits.ablation_values`). Cost: one forward
    of the segment point -> embedding per node, `batch_nodes` nodes per batch."""
    check_points(model, [point])
    clean = cache_points(model, images, [point])[point]
    space = NodeSpace(point, clean, sae)
    run = segment_fn(model, point, images)
    out = []
    with torch.no_grad():
        ref = F.normalize(run(clean) if sae is None else run(space.activation(space.clean)), dim=-1)
        for start in range(0, len(nodes), batch_nodes):
            chunk = list(nodes[start:start + batch_nodes])
            z = space.clean.repeat(len(chunk), *([1] * (space.clean.ndim - 1)))
            z = z.unflatten(0, (len(chunk), len(images)))
            for r, n in enumerate(chunk):
                z[r, ..., n] = fill.to(z)[..., n]
            emb = F.normalize(run(space.activation(z.flatten(0, 1))), dim=-1).unflatten(0, (len(chunk), len(images)))
            out.append(ref[None] - emb)
    return torch.cat(out) if out else clean.new_zeros(0, len(images), ref.shape[-1])


_VIT_COMPONENT = re.compile(r"visual\.blocks\.(\d+)\.(attn\.hook_z|mlp\.hook_post)")


def has_direct_path(model, point: str) -> bool:
    """True where `direct_effects` applies: ViT heads / MLP neurons, ResNet attention-pool heads and
    output channels."""
    return bool(_VIT_COMPONENT.fullmatch(point)) or point in ("visual.attnpool.hook_z", "visual.attnpool.hook_out")


def direct_effects(model, images: Tensor, point: str, nodes: Sequence[int], fill: Tensor | None = None) -> Tensor:
    """[len(nodes), B, D]: each node's direct write to the image embedding (module doc) minus the
    write it makes at its `fill` value (node-last [..., C] as from `circuits.ablation_values`; None:
    zero), mapped to the normalised embedding by the Jacobian of normalisation at the clean
    embedding, (I - e e^T) / |emb|: the direct part of `total_effects`, to first order. Exact up to
    that Jacobian for ResNet attention-pool nodes. Cost: one forward."""
    if not has_direct_path(model, point):
        raise ValueError(f"{point!r} has no direct path to the embedding; use the total effect (method 'total')")
    with torch.no_grad():
        acts = cache_points(model, images, [point, "hook_image_embed"])
        a, emb = acts[point], acts["hook_image_embed"]
        if fill is not None:  # writes are linear in the node's value: write(a) - write(fill) = write(a - fill)
            space = NodeSpace(point, a)
            a = space.activation(space.clean - fill.to(a))
        if point == "visual.attnpool.hook_out":
            raw = torch.stack([a[:, n, None] * F.one_hot(torch.tensor(n), a.shape[1]).to(a) for n in nodes])
        elif point == "visual.attnpool.hook_z":
            w = model.visual.attnpool.c_proj.weight
            dh = a.shape[-1]
            raw = torch.stack([a[:, 0, n] @ w[:, n * dh:(n + 1) * dh].T for n in nodes])
        else:
            raw = _vit_direct(model, images, point, a, nodes)
        e = F.normalize(emb, dim=-1)
        tangent = raw - (raw * e).sum(-1, keepdim=True) * e
        return tangent / emb.norm(dim=-1, keepdim=True)


def _vit_direct(model, images: Tensor, point: str, a: Tensor, nodes: Sequence[int]) -> Tensor:
    """[len(nodes), B, D] unnormalised direct writes of ViT heads / neurons through ln_post and proj."""
    vit = model.visual
    block, kind = _VIT_COMPONENT.fullmatch(point).groups()
    blk = vit.transformer.resblocks[int(block)]
    last = f"visual.blocks.{len(vit.transformer.resblocks) - 1}.hook_resid_post"
    x = cache_points(model, images, [last])[last]
    writes = []
    for n in nodes:
        if kind == "attn.hook_z":
            dh = a.shape[-1]
            c = blk.ls_1(a[:, :, n] @ blk.attn.out_proj.weight[:, n * dh:(n + 1) * dh].T)
        else:
            c = blk.ls_2(a[..., n, None] * blk.mlp.c_proj.weight[:, n])
        writes.append(_readout(vit, c, x))
    return torch.stack(writes)


def _readout(vit, c: Tensor, x: Tensor) -> Tensor:
    """Linear part of pool -> ln_post -> proj for a residual contribution c [B, T, W], the
    LayerNorm's centring and scale taken from the clean final stream x [B, T, W]."""
    def pool(t: Tensor) -> Tensor:
        if vit.pool_type == "tok":
            return t[:, 0]
        if vit.pool_type == "avg":
            return t[:, 1:].mean(1)
        raise ValueError(f"direct effects support ViT pool types 'tok' and 'avg', not {vit.pool_type!r}")

    ln = vit.ln_post
    if vit.final_ln_after_pool:
        c, x = pool(c), pool(x)
    if isinstance(ln, nn.LayerNorm):
        c = (c - c.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt() * ln.weight
    if not vit.final_ln_after_pool:
        c = pool(c)
    return c @ vit.proj if vit.proj is not None else c


# ------------------------------------------------------------------------------------ labels
def text_span(effects: Tensor, words: Tensor, k: int = N_LABELS, center: bool = True) -> list[tuple[int, float]]:
    """Greedy text basis of `effects` [N, D] from word directions `words` [V, D]: k times, the word
    whose (current, renormalised) direction carries the most energy of the (current) effects, with
    the share of the ORIGINAL energy it explains; then that direction is projected out of the effects
    and of every word. `center` subtracts the mean effect first (TextSpan's variance; uncentred:
    the second moment, which keeps what the node adds on average). Returns [(word index, fraction)];
    stops early when no energy or no word direction is left. Cost: O(k V D + k N D)."""
    E = effects.double()
    E = E - E.mean(0, keepdim=True) if center else E.clone()
    total = float((E ** 2).sum())
    if total <= 0:
        return []
    T = words.double().clone()
    picked: list[tuple[int, float]] = []
    for _ in range(min(k, len(T))):
        norms = T.norm(dim=1)
        alive = norms > 1e-8 * max(float(norms.max()), 1e-30)
        if picked:
            alive[[j for j, _ in picked]] = False
        if not alive.any():
            break
        U = T / norms.clamp_min(1e-30)[:, None]
        energy = ((E @ U.T) ** 2).sum(0).masked_fill(~alive, -1.0)
        j = int(energy.argmax())
        picked.append((j, float(energy[j]) / total))
        u = U[j]
        E = E - (E @ u)[:, None] * u
        T = T - (T @ u)[:, None] * u
    return picked


def principal_ceiling(effects: Tensor, k: int, center: bool) -> float:
    """Share of the (centred or uncentred) energy of `effects` [N, D] in its top k principal
    directions: the most any k directions, words or not, can explain."""
    E = effects.double()
    E = E - E.mean(0, keepdim=True) if center else E
    s = torch.linalg.svdvals(E) ** 2
    return float(s[:k].sum() / s.sum()) if float(s.sum()) > 0 else 0.0


def label_effects(effects: Tensor, word_embeddings: Tensor, words: Sequence[str], k: int = N_LABELS,
                  center: bool = False) -> dict[str, Any]:
    """Labels for one node's effects [N, D] (N images): {"labels": [{"word", "fraction",
    "logit_effect"}], "explained" (sum of fractions), "chance" (k/D), "ceiling"
    (`principal_ceiling`), "norm" (mean |effect|)}."""
    if len(words) != len(word_embeddings):
        raise ValueError(f"{len(words)} words but {len(word_embeddings)} word embeddings")
    if not len(words):
        raise ValueError("the vocabulary is empty; give words (--vocab FILE) or a dataset with class names")
    raw = F.normalize(word_embeddings.double(), dim=-1)
    picks = text_span(effects, raw, k, center)
    mean_effect = effects.double().mean(0)
    labels = [{"word": words[j], "fraction": round(f, 6), "logit_effect": float(raw[j] @ mean_effect)}
              for j, f in picks]
    k_used = max(len(picks), 1)
    return {"labels": labels, "explained": round(sum(f for _, f in picks), 6),
            "chance": round(k_used / effects.shape[-1], 6),
            "ceiling": round(principal_ceiling(effects, k_used, center), 6),
            "norm": float(effects.double().norm(dim=-1).mean())}


def choose_method(model, point: str, method: str = "auto") -> str:
    """'textspan' for ViT heads, 'direct' for other nodes with a direct path, 'total' otherwise
    (method 'auto'); an explicit method is checked to apply."""
    if method not in METHODS:
        raise ValueError(f"label method must be one of {', '.join(METHODS)}, got {method!r}")
    direct = has_direct_path(model, point)
    if method == "auto":
        if direct and point.endswith("attn.hook_z") and point.startswith("visual.blocks."):
            return "textspan"
        return "direct" if direct else "total"
    if method in ("textspan", "direct") and not direct:
        raise ValueError(f"method {method!r} needs a node with a direct path to the embedding; {point!r} has none "
                         "(use 'total')")
    return method


# ------------------------------------------------------------------------------------ examples
def top_examples(values: np.ndarray, groups: np.ndarray, k: int) -> dict[int, list[int]]:
    """{group: up to k row indices with the largest `values` in that group, largest first}."""
    values, groups = np.asarray(values), np.asarray(groups)
    out = {}
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        out[int(g)] = rows[np.argsort(-values[rows], kind="stable")[:k]].tolist()
    return out


def domain_summary(effects: Tensor, activations: Tensor, labels: Tensor, domain_idx: np.ndarray, head: Tensor,
                   domains: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per domain: the node's mean (spatially pooled) activation and its ablation effect on the
    true-class cosine logit, mean over the domain's images (ablated minus clean = -E_b . class_b).
    effects [B, D] total effects, activations [B], labels [B] rows of `head` [K, D]."""
    domain_idx = np.asarray(domain_idx)
    h = F.normalize(head.to(effects), dim=-1)[torch.as_tensor(labels, device=effects.device).long()]
    ablation = -(effects * h).sum(-1)
    out = {}
    for d, name in enumerate(domains):
        rows = torch.from_numpy(np.flatnonzero(domain_idx == d))
        if len(rows):
            out[name] = {"mean_activation": float(activations[rows].mean()),
                         "ablation_effect": float(ablation[rows].mean()), "n_images": len(rows)}
    return out


def explain_node(model, images: Tensor, labels: Tensor, domain_idx: np.ndarray, domains: Sequence[str], head: Tensor,
                 point: str, index: int, fill: Tensor, word_embeddings: Tensor, words: Sequence[str], *,
                 method: str = "auto", k: int = N_LABELS, effects: Tensor | None = None) -> dict[str, Any]:
    """One node's explanation on `images` (labels [B] into `head`, domain_idx [B]): labels by
    `choose_method`, explained fractions with chance and ceiling, per-domain mean activation and
    ablation effect (`domain_summary`). `effects` [B, D]: precomputed total effects. Cost: one
    segment forward (+ one forward for direct effects)."""
    method = choose_method(model, point, method)
    total = total_effects(model, images, point, [index], fill)[0] if effects is None else effects
    described = total if method == "total" else direct_effects(model, images, point, [index], fill)[0]
    lab = label_effects(described, word_embeddings, words, k, center=method == "textspan")
    act = node_activations(model, images, point, [index])[:, 0]
    out = {"node": f"{point}/{index}", "point": point, "index": index, "method": method, **lab,
           "domains": domain_summary(total, act, labels, domain_idx, head, domains)}
    if not lab["labels"]:
        out["skipped"] = "no effect on these images (a dead or constant node): no label"
    return out


def node_activations(model, images: Tensor, point: str, nodes: Sequence[int]) -> Tensor:
    """[B, len(nodes)]: each node's activation averaged over positions (tokens, map cells)."""
    a = cache_points(model, images, [point])[point]
    x = NodeSpace(point, a).clean
    x = x.flatten(1, -2).mean(1) if x.ndim > 2 else x
    return x[:, list(nodes)]


def shared_ranking(shared: Mapping[str, set[int]], circuits: Mapping[str, Any], limit: int) -> list[tuple[str, int]]:
    """Nodes of `shared` ({point: node set}) ordered by their mean share of their point's total IG
    score over `circuits` (Circuit objects of the test domain), best first, at most `limit`. Shares,
    not raw scores: raw IG scores grow toward the embedding and would rank only the last point."""
    scored = []
    for p, nodes in shared.items():
        for n in nodes:
            s = [float(c.node_scores[p][n] / c.node_scores[p].sum().clamp_min(1e-30))
                 for c in circuits.values() if p in c.node_scores]
            scored.append((-(sum(s) / len(s)) if s else 0.0, p, n))
    return [(p, n) for _, p, n in sorted(scored)[:limit]]
