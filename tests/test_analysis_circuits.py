"""Circuits: vectorized edge IG vs the naive loop, node scores by hand, circuit invariants,
save/load/draw, similarity known answers, faithfulness, the shared-node test, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipmech.analysis import circuit_similarity as S
from clipmech.analysis.bottleneck_edges import unsplittable_reason
from clipmech.analysis import ablation as AB
from clipmech.analysis import attribution as A
from clipmech.analysis import circuit as CI
from clipmech.analysis import circuits as C
from clipmech.analysis import patching as P
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return HookedCLIP.from_config("tiny-rn").double()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return HookedCLIP.from_config("tiny-vit").double()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.double)
    head = F.normalize(torch.randn(4, 64, generator=gen, dtype=torch.double), dim=-1)
    return images, head, torch.tensor([0, 1, 2])


@pytest.fixture(scope="module")
def circuit(rn, batch):
    images, head, labels = batch
    return C.discover_circuit(rn, images, labels, head, steps=2, meta={"domain": "a", "class": "x"})


# Plans: the cost model's, each strategy forced, and chunks that split the nodes (3 nodes in chunks of 2)
# and the IG path points (2 path points in groups of 1).
_PLANS = [None, "backward", "forward", C.EdgePlan("backward", 2, 1), C.EdgePlan("forward", 2, 1)]


def _assert_plans_match_naive(model, images, u, d, nodes, up_nodes):
    naive = C.reference_ig_edge_scores(model, images, u, d, nodes, steps=3)
    naive = naive if up_nodes is None else naive[:, up_nodes]
    assert naive.abs().max() > 0
    for plan in _PLANS:
        ours = C.ig_edge_scores(model, images, u, d, nodes, steps=3, upstream_nodes=up_nodes, strategy=plan)
        assert ours.shape == naive.shape
        torch.testing.assert_close(ours, naive, rtol=0, atol=1e-6 * float(naive.abs().max()), msg=str(plan))


@pytest.mark.parametrize("pair,nodes,up_nodes", [((0, 1), [0, 2, 5], None), ((5, 6), [0, 2, 5], [1, 3, 4]),
                                                 ((8, 9), [0, 2, 5], [7, 1])])
def test_edge_strategies_match_naive_loop(rn, batch, pair, nodes, up_nodes):
    pts = rn.analysis_points()
    _assert_plans_match_naive(rn, batch[0], pts[pair[0]], pts[pair[1]], nodes, up_nodes)


def test_vit_component_edges_match_naive_loop(vit, batch):
    points = C.component_points(vit)
    _assert_plans_match_naive(vit, batch[0], points[0], points[1], [0, 5, 9], [1])  # heads -> neurons
    _assert_plans_match_naive(vit, batch[0], points[1], points[2], [0, 1], [3, 7, 100])  # neurons -> heads


@pytest.fixture(scope="module")
def rn_deep():
    """tiny-rn with a second layer2 block (an identity skip) and random eval batch-norm statistics and
    affines: open_clip zero-initialises bn3.weight, which would hide the residual branch's edges."""
    torch.manual_seed(1)
    cfg = resolve_config("tiny-rn")[1]
    cfg["vision_cfg"]["layers"] = [1, 2, 1, 1]
    model = HookedCLIP.from_config(cfg)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return model.eval().double()


# Split plans: the cost model's and forced, with 3 nodes on the smaller side in convs of 2 and the 2 path
# points in groups of 1 (a chunk boundary on both).
_SPLIT_PLANS = [None, "split", C.EdgePlan("split", 2, 1)]


@pytest.mark.parametrize("pair,nodes,up_nodes", [
    ((4, 5), [0, 4, 7, 9], [1, 3, 6]),  # avgpool -> layer1.0: 1x1 downsample, no stride; conv over upstream
    ((5, 6), [0, 2, 9], [1, 3, 4, 60, 7]),  # layer1.0 -> layer2.0: strided pools; conv over downstream
    ((6, 7), [1, 2, 3, 6], [2, 3, 6, 17]),  # layer2.0 -> layer2.1: identity skip, shared node ids
    ((6, 7), [2], None),  # all 128 upstream nodes
])
def test_split_edges_match_naive_loop(rn_deep, batch, pair, nodes, up_nodes):
    pts = rn_deep.analysis_points()
    u, d = pts[pair[0]], pts[pair[1]]
    naive = C.reference_ig_edge_scores(rn_deep, batch[0], u, d, nodes, steps=3)
    naive = naive if up_nodes is None else naive[:, up_nodes]
    assert naive.abs().amax(1).min() > 0  # no dead downstream node
    backward = C.ig_edge_scores(rn_deep, batch[0], u, d, nodes, steps=3, upstream_nodes=up_nodes, strategy="backward")
    for plan in _SPLIT_PLANS:
        ours = C.ig_edge_scores(rn_deep, batch[0], u, d, nodes, steps=3, upstream_nodes=up_nodes, strategy=plan)
        torch.testing.assert_close(ours, naive, rtol=0, atol=1e-6 * float(naive.abs().max()), msg=str(plan))
        torch.testing.assert_close(ours, backward, rtol=0, atol=1e-9 * float(naive.abs().max()), msg=str(plan))


def test_split_only_where_the_segment_is_a_plain_bottleneck(rn_deep, batch):
    images = batch[0]
    pts = rn_deep.analysis_points()
    with pytest.raises(ValueError, match="not one ResNet bottleneck; use 'backward' or 'forward'"):
        C.ig_edge_scores(rn_deep, images, pts[3], pts[4], [0], strategy="split")  # act3 -> avgpool
    with pytest.raises(ValueError, match="not one ResNet bottleneck"):
        C.ig_edge_scores(rn_deep, images, pts[-2], pts[-1], [0], strategy="split")  # layer4.0 -> attnpool
    u, d = pts[6], pts[7]
    clean = C.ig_edge_scores(rn_deep, images, u, d, [0, 2], steps=3, upstream_nodes=[2, 5])
    # A hook inside the block changes the segment: the cost model falls back to autograd, which runs it.
    with rn_deep.hooks(fwd_hooks=[("visual.layer2.1.hook_act2", lambda t, hook: 0.5 * t)]):
        with pytest.raises(ValueError, match="hooks are attached inside visual.layer2.1"):
            C.ig_edge_scores(rn_deep, images, u, d, [0, 2], steps=3, upstream_nodes=[2, 5], strategy="split")
        hooked = C.ig_edge_scores(rn_deep, images, u, d, [0, 2], steps=3, upstream_nodes=[2, 5])
        backward = C.ig_edge_scores(rn_deep, images, u, d, [0, 2], steps=3, upstream_nodes=[2, 5], strategy="backward")
    torch.testing.assert_close(hooked, backward)
    assert not torch.allclose(hooked, clean)
    with rn_deep.hooks(bwd_hooks=[("visual.layer2.1.hook_act1", lambda grad, hook: None)]):
        with pytest.raises(ValueError, match="hooks are attached inside visual.layer2.1"):
            C.ig_edge_scores(rn_deep, images, u, d, [0], steps=2, strategy="split")
    block = rn_deep.visual.layer2[1]
    assert unsplittable_reason(block) is None
    block.train()
    try:
        assert "training mode" in unsplittable_reason(block)
    finally:
        block.eval()
    assert "not an open_clip Bottleneck" in unsplittable_reason(rn_deep.visual.attnpool)


def test_edge_plan_cost_model():
    # Deterministic for a shape; forward mode when upstream nodes are few, backward when downstream are.
    args = (8 * 64 * 16 * 16, 8 * 128 * 8 * 8, 13, 7, 9)
    assert C.plan_edges(*args) == C.plan_edges(*args)
    assert C.plan_edges(8 * 65 * 128, 8 * 65 * 256, 300, 1, 9).strategy == "forward"  # ViT heads -> neurons
    assert C.plan_edges(8 * 65 * 256, 8 * 65 * 2 * 32, 1, 26, 9).strategy == "backward"  # neurons -> heads
    # Boundary: backward costs 1 + J, forward 4.5 + f I, f = 1.8 up to 16 upstream positions, 5 from 256.
    assert C.plan_edges(8, 8, 12, 5, 9, up_positions=16).strategy == "backward"  # 13 vs 13.5
    assert C.plan_edges(8, 8, 13, 5, 9, up_positions=16).strategy == "forward"  # 14 vs 13.5
    assert C.plan_edges(8, 8, 52, 26, 9, up_positions=16).strategy == "forward"  # small-map transition: 53 vs 51.3
    assert C.plan_edges(8, 8, 52, 26, 9, up_positions=256).strategy == "backward"  # large maps: 53 vs 134.5
    assert C.plan_edges(8, 8, 25, 4, 9, up_positions=4096).strategy == "forward"  # f capped at 5: 26 vs 24.5
    assert C.plan_edges(8, 8, 23, 4, 9, up_positions=4096).strategy == "backward"  # 24 vs 24.5
    assert C.plan_edges(8, 8, 9, 9, 9).strategy == "backward"  # equal widths stay backward
    # Memory bound: the IG path points are looped once the graph of all of them exceeds the budget.
    big = C.plan_edges(50 * 256 * 56 * 56, 50 * 256 * 56 * 56, 26, 26, 9, strategy="backward")
    assert big.chunk == 1 and big.step_chunk == 2  # 4 GiB / (6 x 321 MB per path point)
    assert C.plan_edges(8, 8, 2, 2, 9, strategy="backward").step_chunk == 9
    assert C.plan_edges(8, 8, 2, 2, 9, strategy="forward").chunk == 2  # all tangents in one vmap
    with pytest.raises(ValueError, match="strategy"):
        C.plan_edges(8, 8, 2, 2, 9, strategy="vmap")
    # Split (bottleneck segments): 1 + 0.2 (I + J), so it beats backward whenever I < 4 J, and forward
    # unless upstream nodes are very few.
    split = C.plan_edges(8, 8, 52, 26, 9, up_positions=16, split_numel=8)
    assert split.strategy == "split" and split.cost["split"] == pytest.approx(1 + 0.2 * 78)
    assert split.chunk == 16 and split.step_chunk == 9  # at most 16 conv inputs per batch
    assert C.plan_edges(8, 8, 9, 9, 9, split_numel=8).strategy == "split"
    assert C.plan_edges(8, 8, 25, 1, 9, up_positions=16, split_numel=8).strategy == "split"  # 6.2 vs forward 6.3
    assert C.plan_edges(8, 8, 26, 1, 9, up_positions=16, split_numel=8).strategy == "forward"  # 6.4 vs 6.3
    assert C.plan_edges(8, 8, 2, 8, 9, up_positions=4096, split_numel=8).strategy == "backward"  # 3 vs 3: a tie
    assert C.plan_edges(8, 8, 2, 7, 9, up_positions=4096, split_numel=8).strategy == "split"  # 3 vs 2.8
    assert C.plan_edges(8, 8, 3, 2, 9, strategy="split", split_numel=8).chunk == 2
    # RN50 layer1 at 224 px, 50 images: (26 + 2 x 16 + 4) x 40 MB + 2 x 321 MB = 3.13 GB per path point.
    rn50 = C.plan_edges(50 * 256 * 56 * 56, 50 * 256 * 56 * 56, 26, 26, 9, split_numel=50 * 64 * 56 * 56)
    assert rn50.strategy == "split" and rn50.chunk == 16 and rn50.step_chunk == 1
    with pytest.raises(ValueError, match="one ResNet bottleneck"):
        C.plan_edges(8, 8, 2, 2, 9, strategy="split")


def test_calibrated_plan_is_cached_and_exact(rn, batch):
    images, _, _ = batch
    pts = rn.analysis_points()
    u, d = pts[5], pts[6]
    A._CALIBRATED.clear()
    ours = C.ig_edge_scores(rn, images, u, d, [0, 2], steps=3, upstream_nodes=[1, 3], calibrate=True)
    (plan,) = A._CALIBRATED.values()
    assert plan.strategy in C.EDGE_STRATEGIES and set(plan.cost) == {"backward_s", "forward_s", "split_s"}
    C.ig_edge_scores(rn, images, u, d, [0, 2], steps=3, upstream_nodes=[1, 3], calibrate=True)
    assert list(A._CALIBRATED.values()) == [plan]  # measured once per shape
    naive = C.reference_ig_edge_scores(rn, images, u, d, [0, 2], steps=3)[:, [1, 3]]
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-6 * float(naive.abs().max()))


def test_node_scores_match_hand_loop(rn, batch):
    images, head, labels = batch
    point = "visual.layer3.0.hook_out"
    steps = 4
    a = P.cache_points(rn, images, [point])[point]
    grads = []
    for s in range(steps):
        x = ((1 - s / steps) * a).requires_grad_(True)
        emb = []
        rn.run_with_hooks(image=images, fwd_hooks=[(point, lambda t, hook: x),
                                                   ("hook_image_embed", lambda t, hook: emb.append(t))])
        m = P.cosine_logits(emb[0], head)[torch.arange(3), labels].sum()
        grads.append(torch.autograd.grad(m, x)[0])
    g = torch.stack(grads).mean(0)
    expected = (g * (0 - a)).sum(dim=(2, 3)).mean(0).abs()
    torch.testing.assert_close(C.ig_node_scores(rn, images, labels, head, point, steps=steps), expected)


def test_circuit_invariants(rn, circuit):
    pts = rn.analysis_points()
    assert circuit.points == pts
    for p in pts:
        assert len(circuit.nodes[p]) == math.ceil(0.1 * len(circuit.node_scores[p]))
        top = torch.argsort(circuit.node_scores[p], descending=True, stable=True)[:len(circuit.nodes[p])]
        assert circuit.nodes[p] == top.tolist()
    pairs = set(zip(pts[:-1], pts[1:]))
    incoming = {}
    for u, i, d, j, w in circuit.edges:
        assert (u, d) in pairs  # consecutive only: no wrap-around from the last point to the first
        assert i in circuit.nodes[u] and j in circuit.nodes[d]
        incoming.setdefault((d, j), []).append(w)
    assert all(len(ws) <= 3 for ws in incoming.values())
    assert len(incoming) == sum(len(circuit.nodes[p]) for p in pts[1:])


def test_edges_are_top_k_by_signed_score(rn, batch, circuit):
    images, _, _ = batch
    u, d = "visual.layer2.0.hook_out", "visual.layer3.0.hook_out"
    mat = C.ig_edge_scores(rn, images, u, d, circuit.nodes[d], steps=2, upstream_nodes=circuit.nodes[u])
    for row, j in zip(mat, circuit.nodes[d]):
        kept = sorted(w for uu, _, dd, jj, w in circuit.edges if (uu, dd, jj) == (u, d, j))
        assert kept == pytest.approx(sorted(row.sort(descending=True).values[:3].tolist()))
    # edges=False: the same nodes and scores, no edge IG; its old spelling top_k=0 still works with a
    # DeprecationWarning; a negative top_k is an error
    pts = [p for p in circuit.points if "layer" in p][-2:]
    nodes_only = C.discover_circuit(rn, images, batch[2], batch[1], points=pts, steps=2, edges=False)
    assert nodes_only.edges == [] and all(nodes_only.nodes[p] == circuit.nodes[p] for p in pts)
    assert nodes_only.meta["top_k"] == 0
    with pytest.warns(DeprecationWarning, match="edges=False"):
        old = C.discover_circuit(rn, images, batch[2], batch[1], points=pts, steps=2, top_k=0)
    assert old.edges == [] and old.nodes == nodes_only.nodes
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        C.discover_circuit(rn, images, batch[2], batch[1], points=pts, top_k=-1)


def test_save_load_and_draw(tmp_path, circuit):
    path = circuit.save(tmp_path / "c")
    back = C.Circuit.load(path)
    assert back.points == circuit.points and back.nodes == circuit.nodes and back.meta == circuit.meta
    assert back.edges == circuit.edges  # JSON floats round-trip exactly
    torch.testing.assert_close(back.node_scores, circuit.node_scores)
    circuit.draw(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    from matplotlib.figure import Figure
    fig = Figure()
    ax = fig.subplots()
    assert circuit.draw(ax=ax) is fig and len(ax.collections) == 1  # drawn into the caller's axes
    with pytest.raises(FileNotFoundError, match="missing"):
        C.Circuit.load(tmp_path / "nope")


def _toy(nodes, edges):
    points = ["p0", "p1"]
    scores = {p: torch.arange(4.0) for p in points}
    return C.Circuit(points, scores, nodes, [(u, i, d, j, 1.0) for u, i, d, j in edges])


def test_similarity_known_answers():
    a = _toy({"p0": [0, 1], "p1": [2]}, [("p0", 0, "p1", 2), ("p0", 1, "p1", 2)])
    b = _toy({"p0": [1, 3], "p1": [2]}, [("p0", 1, "p1", 2), ("p0", 3, "p1", 2)])
    assert S.node_jaccard(a, b) == {"p0": pytest.approx(1 / 3), "p1": 1.0}
    assert S.edge_jaccard(a, b) == pytest.approx(1 / 3)
    for h in (0, 1, 2, 3):
        assert S.wl_kernel(a, a, h) == pytest.approx(1.0)
    # h = 0: cosine of node-label counts = 2 shared labels of 3 and 3 nodes.
    assert S.wl_kernel(a, b, 0) == pytest.approx(2 / 3)
    # h = 1 adds one new label per node; neighbourhoods are successors only (paper.md §8.6): p0/1
    # (successor p1/2) and p1/2 (no successor) match in both: shared = 2 (h0) + 2 (h1) of 6 per graph.
    assert S.wl_kernel(a, b, 1) == pytest.approx(4 / 6)
    # h = 2: the same two nodes match again.
    assert S.wl_kernel(a, b, 2) == pytest.approx(6 / 9)
    same_nodes = _toy({"p0": [0, 1], "p1": [2]}, [("p0", 0, "p1", 2)])
    assert S.wl_kernel(a, same_nodes, 0) == pytest.approx(1.0)
    assert S.wl_kernel(a, same_nodes, 1) < 1.0
    with pytest.raises(ValueError, match="h must be"):
        S.wl_kernel(a, b, -1)
    with pytest.raises(ValueError, match="empty"):
        S.jaccard(set(), set())


def test_bootstrap_ci_contains_estimate(rn, batch):
    images, head, labels = batch
    res = S.bootstrap_circuit_similarity(rn, images, labels, images.flip(0), labels.flip(0), head,
                                         S.edge_jaccard, n_boot=2, steps=1,
                                         points=rn.analysis_points()[-3:])
    assert len(res["samples"]) == 2 and res["ci"][0] <= res["ci"][1]
    assert 0 <= res["estimate"] <= 1
    ci = S.mean_with_ci([0.2, 0.4, 0.6], n_boot=200)
    assert ci["mean"] == pytest.approx(0.4) and ci["ci"][0] <= 0.4 <= ci["ci"][1]


def test_faithfulness_of_full_and_empty_circuits(rn, batch, circuit):
    images, head, labels = batch
    full = C.Circuit(circuit.points, circuit.node_scores,
                     {p: list(range(len(s))) for p, s in circuit.node_scores.items()}, [])
    res = C.faithfulness(rn, full, images, labels, head, ablation="mean")
    assert res["faithfulness"] == pytest.approx(1.0) and res["completeness"] == pytest.approx(1.0)
    empty = C.Circuit(circuit.points, circuit.node_scores, {p: [] for p in circuit.points}, [])
    res = C.faithfulness(rn, empty, images, labels, head, ablation="zero")
    assert res["faithfulness"] == pytest.approx(0.0) and res["completeness"] == pytest.approx(0.0)
    # Ablating nothing by hand reproduces the model's embedding.
    keep = {p: torch.ones(len(s), dtype=torch.bool) for p, s in circuit.node_scores.items()}
    torch.testing.assert_close(C.ablated_embedding(rn, images, keep), rn.encode_image(images))
    two, lab = images[:2], labels[:2]
    domains, mat = C.cross_domain_faithfulness(rn, {"a": circuit, "b": circuit}, {"a": two, "b": two.flip(0)},
                                               {"a": lab, "b": lab.flip(0)}, head, reference={"a": images, "b": images})
    assert domains == ["a", "b"] and mat.shape == (2, 2) and mat[0, 0] == pytest.approx(mat[1, 0])


def test_shared_node_sets(circuit):
    p = "visual.layer3.0.hook_out"
    mk = lambda nodes: C.Circuit(circuit.points, circuit.node_scores,  # noqa: E731
                                 {q: (nodes if q == p else list(circuit.nodes[q])) for q in circuit.points}, [])
    circuits = {"test": {"k": mk([1, 2, 3, 4]), "j": mk([7, 8])},
                "other": {"k": mk([3, 4, 5]), "j": mk([10])}, "third": {"k": mk([1, 9])}}
    shared, unshared = C.shared_nodes(circuits, "test", ["k"], [p])
    assert shared == {p: {1, 3, 4}} and unshared == {p: {2}}
    assert C.shared_nodes(circuits, "test", ["j"], [p]) == ({p: set()}, {p: {7, 8}})
    with pytest.raises(KeyError, match="test domain"):
        C.shared_nodes(circuits, "nope", ["k"], [p])
    with pytest.raises(ValueError, match="at least one domain besides"):
        C.shared_nodes({"test": circuits["test"]}, "test", ["k"], [p])


def test_sae_nodes(rn, batch):
    images, head, labels = batch
    point = "visual.layer2.0.hook_out"

    class Identity:
        def encode(self, x):
            return x

        def decode(self, z):
            return z

    class Linear:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.w = torch.randn(128, 40, generator=g, dtype=torch.double) / 10

        def encode(self, x):
            return torch.relu(x @ self.w)

        def decode(self, z):
            return z @ self.w.T

    a = P.cache_points(rn, images, [point])[point]
    ident = C.NodeSpace(point, a, Identity())
    base = A.ig_node_scores_in(rn, images, labels, head, C.NodeSpace(point, a), 2)
    torch.testing.assert_close(A.ig_node_scores_in(rn, images, labels, head, ident, 2), base)
    lin = C.NodeSpace(point, a, Linear())
    torch.testing.assert_close(lin.activation(lin.clean), a)  # decode(encode) + error = clean
    circuit = C.discover_circuit(rn, images, labels, head, points=[point, "visual.layer3.0.hook_out"], steps=2,
                                 saes={point: Linear()})
    assert len(circuit.node_scores[point]) == 40 and len(circuit.nodes[point]) == 4


def test_vit_head_and_neuron_circuit(vit, batch):
    images, head, labels = batch
    points = C.component_points(vit)
    assert points[0] == "visual.blocks.0.attn.hook_z" and len(points) == 4
    run = P.segment_fn(vit, points[0], images)
    z = P.cache_points(vit, images, [points[0]])[points[0]]
    torch.testing.assert_close(run(z), vit.encode_image(images))
    circuit = C.discover_circuit(vit, images, labels, head, points=points, steps=2)
    assert len(circuit.node_scores[points[0]]) == 2  # heads
    assert len(circuit.node_scores[points[1]]) == 128  # MLP neurons
    assert {(u, d) for u, _, d, _, _ in circuit.edges} == set(zip(points[:-1], points[1:]))


def test_bad_inputs(rn, batch):
    images, head, labels = batch
    pts = rn.analysis_points()
    with pytest.raises(ValueError, match="consecutive"):
        C.ig_edge_scores(rn, images, pts[1], pts[3], [0])
    with pytest.raises(ValueError, match="not an analysis point"):
        C.ig_edge_scores(rn, images, "visual.layer1.0.hook_act1", pts[6], [0])
    with pytest.raises(KeyError, match="visual.hook_act1"):
        C.ig_node_scores(rn, images, labels, head, "visual.hook_actt1")
    with pytest.raises(ValueError, match="downstream_nodes"):
        C.ig_edge_scores(rn, images, pts[5], pts[6], [10_000])
    with pytest.raises(ValueError, match=r"upstream_nodes must lie in \[0, 64\)"):
        C.ig_edge_scores(rn, images, pts[5], pts[6], [0], upstream_nodes=[64])
    with pytest.raises(ValueError, match="forward order"):
        C.discover_circuit(rn, images, labels, head, points=[pts[3], pts[1]])
    with pytest.raises(ValueError, match="labels shape"):
        C.ig_node_scores(rn, images, labels[:2], head, pts[6])


def test_faithfulness_at_one_point_matches_hand_ablation(rn, batch, circuit):
    images, head, labels = batch
    p = "visual.layer3.0.hook_out"
    res = C.faithfulness(rn, circuit, images, labels, head, ablation="zero", points=[p])

    def metric(keep_p):  # mean true-class cosine with only point p ablated (zeros outside keep_p)
        emb = torch.nn.functional.normalize(C.ablated_embedding(rn, images, {p: keep_p}, ablation="zero"), dim=-1)
        return (emb @ head.T)[range(len(labels)), labels].mean().item()

    mask = circuit.keep_masks()[p]
    full, empty, kept = metric(torch.ones_like(mask)), metric(torch.zeros_like(mask)), metric(mask)
    assert res["metric_full"] == pytest.approx(full) and res["metric_empty"] == pytest.approx(empty)
    assert res["faithfulness"] == pytest.approx((kept - empty) / (full - empty))
    with pytest.raises(ValueError, match="not points of the circuit"):
        C.faithfulness(rn, circuit, images, labels, head, points=["visual.layer9.hook_out"])


# ----------------------------------------------------------------- batched discovery and ablation
@pytest.mark.parametrize("arch", ["rn", "vit"])
@pytest.mark.parametrize("max_images", [1, 2, 3, 64])  # chunks that split a batch, end on its edge, hold all
def test_discover_circuits_equals_one_discover_circuit_per_batch(request, batch, arch, max_images):
    model = request.getfixturevalue(arch)
    images, head, _ = batch
    batches = [(images[:1], torch.tensor([1])), (images[1:3], torch.tensor([2, 2])), (images[2:], torch.tensor([0]))]
    metas = [{"cell": i} for i in range(3)]
    grouped = CI.discover_circuits(model, batches, head, steps=2, metas=metas, max_images=max_images)
    for (imgs, labels), meta, got in zip(batches, metas, grouped):
        want = C.discover_circuit(model, imgs, labels, head, steps=2, meta=meta)
        assert got.nodes == want.nodes and got.meta == want.meta
        for p in want.points:
            torch.testing.assert_close(got.node_scores[p], want.node_scores[p], rtol=1e-10, atol=1e-12)
        assert [e[:4] for e in got.edges] == [e[:4] for e in want.edges]
        torch.testing.assert_close(torch.tensor([e[4] for e in got.edges]), torch.tensor([e[4] for e in want.edges]),
                                   rtol=1e-10, atol=1e-12)
    nodes_only = CI.discover_circuits(model, batches, head, steps=2, edges=False, max_images=max_images)
    assert [c.nodes for c in nodes_only] == [c.nodes for c in grouped] and all(not c.edges for c in nodes_only)


def test_discover_circuits_checks_its_inputs(rn, batch):
    images, head, labels = batch
    assert CI.discover_circuits(rn, [], head) == []
    with pytest.raises(ValueError, match="2 metas for 1 batches"):
        CI.discover_circuits(rn, [(images, labels)], head, metas=[{}, {}])
    with pytest.raises(ValueError, match="node_fraction must be in"):
        CI.discover_circuits(rn, [(images, labels)], head, node_fraction=0)
    space = A.node_spaces(rn, images, [rn.analysis_points()[2]])[rn.analysis_points()[2]]
    with pytest.raises(ValueError, match=r"labels shape \(2,\) does not match 3 images"):
        A.ig_node_scores_grouped(rn, images, labels[:2], head, space, 2, [[0, 1, 2]])


@pytest.mark.parametrize("arch", ["rn", "vit"])
@pytest.mark.parametrize("how,batch_size", [("mean", 256), ("mean", 2), ("resample", 4), ("resample", 1)])
def test_ablated_embeddings_equal_one_ablated_embedding_per_setting(request, batch, arch, how, batch_size):
    """Settings stacked into forwards of `batch_size` images (2: one setting per forward with 3 images;
    4: one; 1: fewer images than a setting holds) give each setting's own ablated embedding."""
    model = request.getfixturevalue(arch)
    images, _, _ = batch
    points = model.analysis_points()[1:4]
    gen = torch.Generator().manual_seed(5)
    fill = C.ablation_values(model, images.flip(0), points, how)
    n = {p: fill[p].shape[-1] for p in points}
    keep = {p: torch.rand(4, n[p], generator=gen) < 0.5 for p in points}
    keep = {p: torch.cat([m[:3], torch.ones(1, n[p], dtype=torch.bool)]) for p, m in keep.items()}  # last: keep all
    got = AB.ablated_embeddings(model, images, keep, fill, batch=batch_size)
    assert got.shape[:2] == (4, len(images))
    for s in range(4):
        want = C.ablated_embedding(model, images, {p: keep[p][s] for p in points}, fill=fill)
        torch.testing.assert_close(got[s], want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        clean = model.encode_image(images)
    torch.testing.assert_close(got[3], clean, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="same number of settings"):
        AB.ablated_embeddings(model, images, {points[0]: keep[points[0]], points[1]: keep[points[1]][:2]}, fill)


def test_faithfulness_curve_matches_its_definition_setting_by_setting(rn, batch, circuit):
    """f(x) = (m(C_x) - m(empty)) / (m(N) - m(empty)), each m from its own ablated forward."""
    images, head, labels = batch
    points = [p for p in circuit.points if not p.endswith("hook_input")]
    fill = C.ablation_values(rn, images, points, "zero")  # a random net's mean ablation barely moves m
    metric = lambda e: float(P.cosine_logits(e, head).gather(1, labels[:, None]).mean())  # noqa: E731
    m = {x: metric(C.ablated_embedding(rn, images, C.top_fraction_masks(circuit, x, points), fill=fill))
         for x in C.FAITHFULNESS_SIZES}
    empty = metric(C.ablated_embedding(rn, images, {p: ~k for p, k in C.top_fraction_masks(circuit, 100, points).items()},
                                       fill=fill))
    got = C.faithfulness_curve(rn, circuit, images, labels, head, fill=fill)
    want = [(m[x] - empty) / (m[100] - empty) for x in C.FAITHFULNESS_SIZES]
    assert got["f"][-1] == pytest.approx(1.0)
    assert got["f"] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_domain_similarity_known_answers():
    """Two domains x two classes of toy circuits: node Jaccard per class by hand, the mean over the
    classes both domains hold, a subset with one class (no CI), and NaN where no class reaches."""
    a_x = _toy({"p0": [0, 1], "p1": [2]}, [("p0", 0, "p1", 2)])
    b_x = _toy({"p0": [1, 3], "p1": [2]}, [("p0", 1, "p1", 2)])
    a_y = _toy({"p0": [0], "p1": [1]}, [("p0", 0, "p1", 1)])
    b_y = _toy({"p0": [0], "p1": [1]}, [("p0", 0, "p1", 1)])
    circuits = {"a": {"x": a_x, "y": a_y}, "b": {"x": b_x, "y": b_y}, "c": {}}
    res = S.domain_similarity(circuits, ["a", "b", "c"], {"all": ["x", "y"], "one": ["x"]}, ["p0", "p1"])
    # class x: p0 1/3, p1 1 -> 2/3; class y: identical -> 1; mean over classes 5/6
    assert res["node_jaccard"]["mean"][0][1] == pytest.approx(5 / 6) == res["node_jaccard"]["all"]["mean"][1][0]
    assert res["node_jaccard"]["one"]["mean"][0][1] == pytest.approx(2 / 3)
    assert res["node_jaccard"]["one"]["ci95_over_classes"][0][1] is None  # one class: no CI
    assert res["edge_jaccard"]["mean"][0][1] == pytest.approx((0 + 1) / 2)
    assert math.isnan(res["node_jaccard"]["mean"][0][2]) and res["node_jaccard"]["mean"][0][0] == 1.0
    assert res["node_jaccard_per_point"]["p0"][0][1] == pytest.approx((1 / 3 + 1) / 2)


def test_load_matching_is_a_cache_check(tmp_path, circuit):
    path = circuit.save(tmp_path / "c")
    assert C.Circuit.load_matching(path, {"domain": "a", "class": "x"}).nodes == circuit.nodes
    assert C.Circuit.load_matching(path, {"domain": "a", "class": "y"}) is None  # other settings
    assert C.Circuit.load_matching(tmp_path / "missing", {}) is None
    path.with_suffix(".pt").unlink()  # half a circuit is no cache hit
    assert C.Circuit.load_matching(path, {"domain": "a"}) is None


def test_patching_agreement_rows_and_the_constant_boundary(rn, batch):
    images, head, labels = batch
    points = rn.analysis_points()[-2:]
    source = torch.flip(images, (0,))
    rows, values = P.patching_agreement(rn, images, source, labels, head, points, steps=2)
    for p in points:
        v = values[p]
        assert v["exact"].shape == v["attribution"].shape == v["ig"].shape and v["exact"].abs().max() > 0
        for name in ("attribution", "ig"):
            assert rows[p][f"spearman_{name}_vs_exact"] == pytest.approx(P.spearman(v[name], v["exact"]))
    # the source is the receiver: every exact effect is 0, a constant vector, so no correlation (None)
    rows, values = P.patching_agreement(rn, images, images, labels, head, points[-1:], steps=2)
    assert values[points[-1]]["exact"].abs().max() == 0
    assert rows[points[-1]] == {"spearman_attribution_vs_exact": None, "spearman_ig_vs_exact": None}
