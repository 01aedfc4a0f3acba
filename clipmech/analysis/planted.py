"""Planted circuits: a CLIP image tower rewritten by weight surgery so that the evidence for one
class flows through a node and edge set known by construction (the ground truth that circuit
discovery methods are scored against, `clipmech.analysis.discovery`).

The tower up to an upstream point u stays as it was (trained features). The segment u -> d (tiny-rn:
layer3.0 -> layer4.0, tiny-vit: block 0 -> block 1 residual streams) and the readout d -> embedding
are rewritten so that every downstream node j is a one-layer ReLU unit of a few upstream nodes,
d_j = relu(sum_i w_ji s_i + b_j) with s_i = u_i / scale_i (the upstream channel rescaled to about 1
on the images), and the embedding is emb = (sum_j r_j d_j) e + C0 e2: e the planted class's head
row, e2 an orthogonal direction carrying a constant C0, so the class logit cos(emb, e) depends on
the image only through the planted units. Each motif is a small table of units (`motif_units`);
its ground truth is every node and edge with a nonzero weight into a unit with a nonzero readout.
Exactness (every other node's and edge's ablation effect is zero) is checked by the tests, not
assumed. Construction details and the predicted outcome per method: docs/circuit_validity.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from clipmech.analysis.discovery import MASK_STEPS, METHODS, discover
from clipmech.analysis.edge_ablation import Segment
from clipmech.analysis.engine_adapter import cache_points, true_class_logit

MOTIFS = ("control", "redundancy", "cancellation", "saturation", "distractor")
THRESHOLD = 0.5  # c: the ReLU knee of the redundancy and saturation units, in units of a typical s_i (~1)
CANCEL_GAIN = 4.0  # L: readout of each of the two cancelling units
INHIBIT_GAIN = 2.0  # readout of the saturated inhibitor
DISTRACTOR_GAIN = 5.0  # weight of a distractor unit on its (large) upstream channel; its readout is 0
CONSTANT = 10.0  # C0: the constant embedding component beside the planted logit direction


@dataclass(frozen=True)
class Unit:
    """One planted downstream unit: d = relu(sum_k weights[k] * s_{inputs[k]} + bias), read out
    with `readout` into the class direction. Inputs are roles ('a', 'b', 'big0', ...)."""

    inputs: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    readout: float


def motif_units(motif: str, n_distractors: int = 3) -> list[Unit]:
    """The planted units of a motif (s_a, s_b >= about 1 on the images):
    control: two independent paths a -> d0, b -> d1, logit s_a + s_b;
    redundancy: d0 = relu(s_a + s_b), d1 = relu(s_a + s_b - c), logit d0 - d1 = min(s_a + s_b, c),
      each of a, b alone keeps it at c;
    cancellation: a -> d0 and a -> d1 read out +L and -L (net 0, each large), plus b -> d2;
    saturation: an inhibitor d0 = relu(c - s_a), at its flat part on the images (0), read out -2, so
      removing a releases it; plus b -> d1;
    distractor: a -> d0, plus units of the largest upstream channels with 5x gain and readout 0."""
    c = THRESHOLD
    table = {
        "control": [Unit(("a",), (1.0,), 0.0, 1.0), Unit(("b",), (1.0,), 0.0, 1.0)],
        "redundancy": [Unit(("a", "b"), (1.0, 1.0), 0.0, 1.0), Unit(("a", "b"), (1.0, 1.0), -c, -1.0)],
        "cancellation": [Unit(("a",), (1.0,), 0.0, CANCEL_GAIN), Unit(("a",), (1.0,), 0.0, -CANCEL_GAIN),
                         Unit(("b",), (1.0,), 0.0, 1.0)],
        "saturation": [Unit(("a",), (-1.0,), c, -INHIBIT_GAIN), Unit(("b",), (1.0,), 0.0, 1.0)],
        "distractor": [Unit(("a",), (1.0,), 0.0, 1.0)]
        + [Unit((f"big{k}",), (DISTRACTOR_GAIN,), 0.0, 0.0) for k in range(n_distractors)],
    }
    if motif not in table:
        raise ValueError(f"unknown motif {motif!r}; choose one of {MOTIFS}")
    return table[motif]


@dataclass
class PlantedCircuit:
    """A rewritten copy of a model and its ground truth. `upstream` / `downstream`: the planted
    points; `head` [2, D] (row 0 the planted class e, row 1 the constant direction e2); every image
    has label 0. `nodes` {point: true node indices}; `edges` true (upstream node, downstream node)
    pairs; `units` the downstream node of each planted unit; `roles` the upstream node of each role;
    `meta` the scales and, for roles a and b, the share of (image, position) values with s >= c
    (the regime the redundancy and saturation units are designed for)."""

    model: Any
    motif: str
    upstream: str
    downstream: str
    head: Tensor
    nodes: dict[str, list[int]]
    edges: list[tuple[int, int]]
    units: list[int]
    roles: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    def labels(self, n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.long)


def planted_points(model) -> tuple[str, str]:
    """The (upstream, downstream) points a planted circuit is built on: the last two bottleneck
    outputs of a ResNet tower, the last two block outputs of a ViT tower."""
    points = model.analysis_points()
    blocks = [p for p in points if p.endswith(("hook_out", "hook_resid_post")) and "attnpool" not in p]
    if len(blocks) < 2:
        raise ValueError(f"a planted circuit needs two consecutive blocks before the readout; the model has {blocks}")
    return blocks[-2], blocks[-1]


def _is_vit(model) -> bool:
    return hasattr(model.visual, "transformer")


def _directions(dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two orthonormal random directions of the embedding space (e, e2)."""
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64))
    return q[:, 0], q[:, 1]


def _upstream_signal(model, images: Tensor, upstream: str) -> Tensor:
    """[N, C]: the upstream values the planted units read, one row per (image, readout position):
    ResNet: the 2x2-pooled map the downsample sees; ViT: the class token."""
    act = cache_points(model, images, [upstream])[upstream]
    if _is_vit(model):
        return act[:, 0]
    pooled = F.avg_pool2d(act, 2)
    return pooled.movedim(1, -1).reshape(-1, act.shape[1])


def _choose_roles(signal: Tensor, n_big: int, exclude: set[int]) -> tuple[dict[str, int], dict[int, float]]:
    """Roles a, b: the two channels whose signed values are most consistent (largest 5 % quantile
    over median); big0..: the channels of largest mean |value| among the rest. Returns the roles and
    each chosen channel's signed scale (the median), so s_i = u_i / scale_i is about 1."""
    sign = torch.where(signal.median(0).values >= 0, 1.0, -1.0).to(signal)
    signed = signal * sign
    median = signed.median(0).values
    consistency = torch.where(median > 0, signed.quantile(0.05, dim=0) / median.clamp_min(1e-12), -torch.inf)
    for c in exclude:
        consistency[c] = -torch.inf
    order = torch.argsort(consistency, descending=True, stable=True).tolist()
    roles = {"a": order[0], "b": order[1]}
    size = signal.abs().mean(0)
    for c in list(exclude) + [roles["a"], roles["b"]]:
        size[c] = -1
    for k, c in enumerate(torch.argsort(size, descending=True, stable=True)[:n_big].tolist()):
        roles[f"big{k}"] = c
    return roles, {c: float(median[c] * sign[c]) for c in roles.values()}


def _truth(units: list[Unit], slots: list[int], roles: dict[str, int]) -> tuple[set[int], set[int], set[tuple[int, int]]]:
    up, down, edges = set(), set(), set()
    for unit, j in zip(units, slots):
        if unit.readout == 0:
            continue
        down.add(j)
        for role, w in zip(unit.inputs, unit.weights):
            if w != 0:
                up.add(roles[role])
                edges.add((roles[role], j))
    return up, down, edges


@torch.no_grad()
def plant_circuit(model, images: Tensor, motif: str, *, seed: int = 0, n_distractors: int = 3) -> PlantedCircuit:
    """A copy of `model` (tiny-rn-like ResNet or ViT HookedCLIP, eval mode) with `motif` planted
    between `planted_points(model)`, the upstream channels chosen and scaled on `images`. The
    original model is not changed. Cost: two forwards over `images` plus copying the model."""
    units = motif_units(motif, n_distractors)
    model = copy.deepcopy(model).eval()
    upstream, downstream = planted_points(model)
    gen = torch.Generator().manual_seed(seed)
    n_down = cache_points(model, images[:1], [downstream])[downstream].shape[-1 if _is_vit(model) else 1]
    slots = torch.randperm(n_down, generator=gen)[:len(units) + 1].tolist()  # + 1: the ViT's constant slot
    if _is_vit(model):
        _silence_vit_dims(model, slots)
    signal = _upstream_signal(model, images, upstream)
    roles, scales = _choose_roles(signal, n_distractors, set(slots) if _is_vit(model) else set())
    e, e2 = _directions(model.visual.output_dim, gen)
    weight = torch.zeros(n_down, signal.shape[1], dtype=torch.float64)
    bias = torch.zeros(n_down, dtype=torch.float64)
    readout = torch.zeros(n_down, dtype=torch.float64)
    for unit, j in zip(units, slots):
        for role, w in zip(unit.inputs, unit.weights):
            weight[j, roles[role]] += w / scales[roles[role]]
        bias[j], readout[j] = unit.bias, unit.readout
    (_write_vit if _is_vit(model) else _write_resnet)(model, weight, bias, readout, e, e2, slots[-1])
    up, down, edges = _truth(units, slots, roles)
    s = signal / torch.tensor([scales.get(c, 1.0) for c in range(signal.shape[1])], dtype=signal.dtype)
    regime = {r: float((s[:, c] >= THRESHOLD).double().mean()) for r, c in roles.items() if r in ("a", "b")}
    head = torch.stack([e, e2]).to(next(model.parameters()).dtype)
    return PlantedCircuit(model, motif, upstream, downstream, head, {upstream: sorted(up), downstream: sorted(down)},
                          sorted(edges), slots[:len(units)], roles,
                          {"scales": {r: scales[c] for r, c in roles.items()}, "share_in_regime": regime,
                           "units": [vars(u) for u in units]})


def _silence_vit_dims(model, dims: list[int]) -> None:
    """Zero residual dims `dims` everywhere up to the upstream point (ln_pre output, block 0's
    attention and MLP writes), so the planted downstream dims carry only the planted units."""
    vit = model.visual
    vit.ln_pre.weight[dims] = 0
    vit.ln_pre.bias[dims] = 0
    for blk in vit.transformer.resblocks[:-1]:
        for lin in (blk.attn.out_proj, blk.mlp.c_proj):
            lin.weight[dims] = 0
            lin.bias[dims] = 0


def _write_resnet(model, weight: Tensor, bias: Tensor, readout: Tensor, e: Tensor, e2: Tensor, _spare: int) -> None:
    """Last bottleneck: residual branch off (bn3 = 0), downsample = pool -> planted 1x1 conv -> bias,
    so d_j = relu(W_j . pool(u) + b_j). Attention pool: zero queries and keys (uniform attention, the
    spatial mean), values the identity minus the mean positional embedding, c_proj = e r^T + C0 e2."""
    vis = model.visual
    block = vis.layer4[-1]
    if block.downsample is None:
        raise ValueError("planting on a ResNet needs a downsampling last bottleneck (open_clip ModifiedResNet)")
    block.bn3.weight.zero_()
    block.bn3.bias.zero_()
    _, conv, bn = block.downsample
    conv.weight.copy_(weight[:, :, None, None])
    bn.running_mean.zero_()
    bn.running_var.fill_(1 - bn.eps)
    bn.weight.fill_(1)
    bn.bias.copy_(bias)
    pool = vis.attnpool
    for lin in (pool.q_proj, pool.k_proj):
        lin.weight.zero_()
        lin.bias.zero_()
    pool.v_proj.weight.copy_(torch.eye(pool.v_proj.weight.shape[0]))
    pool.v_proj.bias.copy_(-pool.positional_embedding.mean(0))
    pool.c_proj.weight.copy_(e[:, None] * readout[None])
    pool.c_proj.bias.copy_(CONSTANT * e2)


def _write_vit(model, weight: Tensor, bias: Tensor, readout: Tensor, e: Tensor, e2: Tensor, spare: int) -> None:
    """Last block: attention writes nothing; its MLP, with the LayerNorm before it an identity and a
    ReLU for the GELU, holds one hidden neuron per planted unit writing to its residual dim; ln_post
    becomes an affine map adding C0 on the spare (silenced) dim, and proj maps planted dims to e
    (times the readout) and the spare dim to e2."""
    vit = model.visual
    blk = vit.transformer.resblocks[-1]
    blk.attn.out_proj.weight.zero_()
    blk.attn.out_proj.bias.zero_()
    blk.ln_2 = nn.Identity()
    blk.mlp.gelu = nn.ReLU()
    dims = [int(j) for j in torch.nonzero(weight.abs().sum(1) + bias.abs() > 0).flatten()]
    dims = sorted(set(dims) | {int(j) for j in torch.nonzero(readout).flatten()})
    fc, proj = blk.mlp.c_fc, blk.mlp.c_proj
    if len(dims) > fc.out_features:
        raise ValueError(f"{len(dims)} planted units do not fit the {fc.out_features} MLP neurons")
    fc.weight.zero_()
    fc.bias.zero_()
    proj.weight.zero_()
    proj.bias.zero_()
    for n, j in enumerate(dims):
        fc.weight[n] = weight[j]
        fc.bias[n] = bias[j]
        proj.weight[j, n] = 1
    width = vit.ln_post.normalized_shape[0]
    post = nn.Linear(width, width).to(fc.weight)
    post.weight.copy_(torch.eye(width))
    post.bias.zero_()
    post.bias[spare] = CONSTANT
    vit.ln_post = post
    out = torch.zeros_like(vit.proj)
    out += readout[:, None] * e[None]
    out[spare] = e2
    vit.proj.copy_(out)


# ------------------------------------------------------------------------- scores against the truth
def auroc(scores: Tensor, truth: Tensor) -> float:
    """Area under the ROC curve of `scores` for the boolean `truth` (ties count one half; -inf is
    the lowest score). Raises when truth is all True or all False."""
    truth = truth.flatten().bool()
    if truth.all() or not truth.any():
        raise ValueError("AUROC needs both true and false items")
    return float(roc_auc_score(truth.numpy(), _finite(scores).numpy()))


def precision_at_true_size(scores: Tensor, truth: Tensor) -> float:
    """Share of true items among the top k = |truth| by score, ties at the k-th score resolved by
    their expected value under a random order (so a method cannot gain from index order)."""
    s, truth = _finite(scores), truth.flatten().bool()
    k = int(truth.sum())
    if k == 0:
        raise ValueError("precision at the true size needs at least one true item")
    kth = torch.sort(s, descending=True).values[k - 1]
    above, tied = s > kth, s == kth
    expected_tied = (k - int(above.sum())) * float(truth[tied].double().mean())
    return (int(truth[above].sum()) + expected_tied) / k


def _finite(scores: Tensor) -> Tensor:
    s = scores.detach().flatten().double().cpu()
    low = s[torch.isfinite(s)].min() if torch.isfinite(s).any() else torch.tensor(0.0, dtype=s.dtype)
    return s.nan_to_num(nan=float(low) - 1, neginf=float(low) - 1)


def truth_masks(pc: PlantedCircuit, n_up: int, n_down: int) -> tuple[Tensor, Tensor]:
    """(node truth [n_up + n_down] in the order upstream then downstream, edge truth [J, I])."""
    nodes = torch.zeros(n_up + n_down, dtype=torch.bool)
    nodes[pc.nodes[pc.upstream]] = True
    nodes[[n_up + j for j in pc.nodes[pc.downstream]]] = True
    edges = torch.zeros(n_down, n_up, dtype=torch.bool)
    for i, j in pc.edges:
        edges[j, i] = True
    return nodes, edges


ZERO_TOL = 1e-6  # scores below this share of a method's largest |score| are zero (rounding of exact cancellations)


def _rounded(scores: Tensor) -> Tensor:
    s = scores.detach().double().cpu()
    finite = s[torch.isfinite(s)]
    top = float(finite.abs().max()) if len(finite) else 0.0
    return torch.where(s.abs() <= ZERO_TOL * top, torch.zeros_like(s), s)


def score_planted(pc: PlantedCircuit, nodes: dict[str, Tensor], edges: Tensor | None) -> dict[str, float | None]:
    """AUROC and precision at the true size of one method's node scores (both points ranked
    together) and edge scores [J, I] against the planted truth (edge entries None without edges).
    Scores within `ZERO_TOL` of zero relative to the method's largest count as 0: an exact
    cancellation (cancellation motif) leaves ~1e-17 in float64 that would otherwise rank above the
    exact zeros of unconnected nodes."""
    up, down = nodes[pc.upstream], nodes[pc.downstream]
    node_truth, edge_truth = truth_masks(pc, len(up), len(down))
    node_scores = _rounded(torch.cat([up.double(), down.double()]))
    edges = None if edges is None else _rounded(edges)
    out = {"node_auroc": auroc(node_scores, node_truth), "node_precision": precision_at_true_size(node_scores, node_truth),
           "edge_auroc": None, "edge_precision": None}
    if edges is not None:
        out |= {"edge_auroc": auroc(edges, edge_truth), "edge_precision": precision_at_true_size(edges, edge_truth)}
    return out


# ------------------------------------------------------------------------------------ the table
TOP_EDGES_KEPT = 200  # edges per method and cell written out (the full [J, I] matrix is 131k for tiny-rn)


def evaluate_planted(model, images: Tensor, *, motifs=MOTIFS, methods=None, steps: int = 10,
                     mask_steps: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Plant each motif in `model` on `images`, run each discovery method (default all) under zero
    ablation and score it against the truth. One row per (motif, method): the four scores,
    seconds, note, the share of (image, position) values with s_a, s_b >= c, the truth, the node scores and the top `TOP_EDGES_KEPT` edges [(i, j, score)].
    Cost: per motif, the sum of the methods' costs (`clipmech.analysis.discovery`)."""
    rows = []
    for motif in motifs:
        pc = plant_circuit(model, images, motif, seed=seed)
        labels = pc.labels(len(images))
        seg = Segment.build(pc.model, images, pc.upstream, pc.downstream, pc.head, labels,
                            true_class_logit(pc.head, labels), "zero")
        for method in methods or METHODS:
            ms = discover(seg, method, steps=steps, seed=seed, mask_steps=mask_steps or MASK_STEPS)
            rows.append({"motif": motif, "method": method, **score_planted(pc, ms.nodes, ms.edges),
                         "seconds": ms.seconds, "note": ms.note, "share_in_regime": pc.meta["share_in_regime"],
                         "truth": {"nodes": pc.nodes, "edges": pc.edges},
                         "node_scores": {p: s.double().tolist() for p, s in ms.nodes.items()},
                         "top_edges": _top_edges(ms.edges)})
    return rows


def _top_edges(edges: Tensor | None) -> list[tuple[int, int, float]] | None:
    if edges is None:
        return None
    flat = edges.flatten().double().nan_to_num(neginf=-1e300)
    order = torch.argsort(flat, descending=True, stable=True)[:TOP_EDGES_KEPT]
    return [(int(k) % edges.shape[1], int(k) // edges.shape[1], float(flat[k])) for k in order]
