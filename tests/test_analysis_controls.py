"""Sharedness controls (issue 13): matched controls, Hungarian latent matching, known-answer nulls,
normalisation rules, faithfulness areas, the paper's SAE loss, and the causal test on a tiny model."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmech.analysis import circuits as C
from clipmech.analysis import controls as K
from clipmech.analysis.circuit_similarity import node_jaccard
from clipmech.analysis.sae import SAEConfig, SparseAutoencoder, paper_l1
from clipmech.analysis.sharing import match_latents, pair_shares, require_sparse, seed_ceiling


# ------------------------------------------------------------------------------ matched controls
def test_control_quantiles_match_shared_within_one_stratum():
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=400)
    order = np.argsort(-scores)
    shared = order[:60:2]          # biased towards high scores, like shared nodes
    pool = np.setdiff1d(np.arange(400), shared)
    m = K.matched_controls(shared, pool, scores, n_strata=4, rng=np.random.default_rng(1))
    assert len(m["control"]) == len(m["shared"]) and not set(m["control"]) & set(shared)
    both = np.concatenate([shared, pool])
    _, edges = K.score_strata(scores[both], 4)
    stratum = lambda v: np.searchsorted(edges[1:-1], v, side="right")  # noqa: E731
    for q in np.linspace(0, 1, 11):
        assert stratum(np.quantile(scores[m["control"]], q, method="inverted_cdf")) == \
            stratum(np.quantile(scores[m["shared"]], q, method="inverted_cdf"))
    # identical counts per stratum
    assert np.array_equal(np.bincount(stratum(scores[m["shared"]]), minlength=4),
                          np.bincount(stratum(scores[m["control"]]), minlength=4))


def test_unmatchable_strata_are_trimmed_and_reported():
    scores = np.arange(20, dtype=float)
    shared, pool = [16, 17, 18, 19, 0], list(range(1, 16))   # four top nodes, no pool node up there
    m = K.matched_controls(shared, pool, scores, n_strata=4, rng=np.random.default_rng(0))
    # strata of 20 values: the top stratum (15..19) holds shared 16-19 and only pool node 15
    assert m["trimmed"] == 3 and len(m["shared"]) == 2 and 0 in m["shared"]
    assert len(m["control"]) == 2
    with pytest.raises(ValueError, match="disjoint"):
        K.matched_controls([1, 2], [2, 3], scores, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_strata"):
        K.score_strata(scores, 0)


# ------------------------------------------------------------------------------ latent matching
def test_hungarian_recovers_a_permuted_sae():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(16, 48))
    perm = torch.randperm(48)
    m = match_latents(sae.W_dec.detach(), sae.W_dec.detach()[perm])
    assert m["fraction_matched"] == 1.0
    assert np.array_equal(perm.numpy()[m["b"]], m["a"])  # b's latent m["b"][i] is a's latent m["a"][i]
    assert np.allclose(m["cosine"], 1.0)
    # threshold boundary: an exact cosine equal to the threshold counts as matched
    a, b = torch.eye(2, dtype=torch.double), torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.double)
    assert match_latents(a, b, threshold=0.6)["cosine"].tolist() == [0.6, 1.0]
    assert match_latents(a, b, threshold=0.6)["matched"].tolist() == [True, True]
    assert match_latents(a, b, threshold=0.6 + 1e-12)["fraction_matched"] == 0.5
    with pytest.raises(ValueError, match="widths differ"):
        match_latents(torch.eye(3), torch.eye(4))


def test_seed_ceiling_is_one_for_a_permuted_copy_and_floor_permutes_classes():
    g = torch.Generator().manual_seed(0)
    H = torch.randint(0, 5, (3, 2, 30), generator=g)
    perm = torch.randperm(30, generator=g)
    Hb = H[..., perm]  # b's latent j is a's latent perm[j]
    m = match_latents(torch.eye(30), torch.eye(30)[perm])
    ceil = seed_ceiling(H, Hb, m)
    assert np.allclose(ceil, 1.0)
    # two classes with disjoint histograms: score 1 (same class), class-permuted floor 0
    H2 = torch.zeros(2, 2, 40, dtype=torch.long)
    H2[0, :, :20] = torch.arange(20, 0, -1)
    H2[1, :, 20:] = torch.arange(20, 0, -1)
    assert pair_shares(H2, 0).tolist() == [1.0, 1.0]
    assert pair_shares(H2, 0, permuted=True).tolist() == [0.0, 0.0]


def test_dense_saes_are_refused_at_the_boundary():
    require_sparse(63.9, 64)
    with pytest.raises(ValueError, match="--allow-dense"):
        require_sparse(64.0, 64)
    require_sparse(64.0, 64, allow_dense=True)


# ------------------------------------------------------------------------------ SAE loss
def test_sae_loss_is_the_papers_formula_on_a_hand_made_input():
    sae = SparseAutoencoder(SAEConfig(d_in=2, n_latents=2))
    assert sae.cfg.l1_coef == pytest.approx(1e-4 * 1024 / 2) == paper_l1(2)
    assert paper_l1(64) == pytest.approx(1.6e-3) and paper_l1(1024) == pytest.approx(1e-4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_pre.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # z = relu(x - b_pre) = [[0.5, 2], [2.5, 0]]; x_hat = z + b_pre = [[1, 2], [3, 0]]
    # error averaged over features: row 1 0, row 2 (0 + 1)/2 = 0.5 -> mean 0.25; |z|_1 = 2.5, 2.5
    loss, parts = sae.loss(x)
    assert parts["recon"] == pytest.approx(0.25)
    assert float(loss.detach()) == pytest.approx(0.25 + paper_l1(2) * 2.5)
    assert parts["l0"] == pytest.approx(1.5)
    # init: b_pre zero, encoder Kaiming-uniform with fan-in d_in (bound sqrt(6 / d_in))
    big = SparseAutoencoder(SAEConfig(d_in=64, n_latents=256))
    assert torch.all(big.b_pre == 0)
    assert float(big.W_enc.abs().max()) <= math.sqrt(6 / 64) and float(big.W_enc.abs().max()) > 0.9 * math.sqrt(6 / 64)


# ------------------------------------------------------------------------------ nulls
def _random_circuit(rng, points, n_nodes, k, name=None):
    nodes = {p: sorted(rng.choice(n_nodes, k, replace=False).tolist()) for p in points}
    scores = {p: torch.rand(n_nodes) for p in points}
    edges = [(u, int(rng.choice(nodes[u])), d, j, 1.0) for u, d in zip(points[:-1], points[1:]) for j in nodes[d]]
    return C.Circuit(list(points), scores, nodes, edges, {"name": name})


def test_known_answer_nulls():
    rng = np.random.default_rng(0)
    points, n, k = ["p0", "p1", "p2"], 40, 8
    sim = lambda a, b: float(np.mean(list(node_jaccard(a, b).values())))  # noqa: E731
    circuits = {d: {c: _random_circuit(rng, points, n, k) for c in range(30)} for d in ("t", "u", "v")}
    identical = {d: {c: circ for c, circ in per.items()} for d, per in circuits.items()}
    res = K.circuit_nulls(circuits, identical, "t", sim)
    assert res["ceiling"]["mean"] == 1.0 and res["ceiling"]["cells_skipped"] == 0
    # expected Jaccard of two random k-subsets of n: sum over overlap i of P(i) * i / (2k - i)
    from scipy.stats import hypergeom
    expected = sum(hypergeom(n, k, k).pmf(i) * i / (2 * k - i) for i in range(k + 1))
    assert res["floor"]["mean"] == pytest.approx(expected, abs=0.01)
    assert res["floor"]["ci"][0] < expected < res["floor"]["ci"][1]
    # unrelated circuits also give a score near the floor; repeats missing -> ceiling undefined, counted
    none = K.circuit_nulls(circuits, {}, "t", sim)
    assert none["ceiling"]["mean"] is None and none["ceiling"]["cells_skipped"] == 90
    assert "disjoint drawing set" in none["ceiling"]["reason"]


def test_normalisation_rule_boundaries():
    floor = {"mean": 0.1, "ci": [0.05, 0.2], "n": 5}
    ceiling = {"mean": 0.6, "ci": [0.4, 0.8], "n": 5}
    assert K.normalize(0.35, floor, ceiling) == (pytest.approx(0.5), None)
    touching = {"mean": 0.5, "ci": [0.2, 0.8], "n": 5}   # ceiling CI low == floor CI high: not beyond
    value, reason = K.normalize(0.35, floor, touching)
    assert value is None and "does not exceed floor" in reason
    assert K.normalize(0.3, floor, {"mean": None, "ci": None, "n": 0, "reason": "r"}) == (None, "no ceiling: r")
    assert K.normalize(0.3, {"mean": 0.1, "ci": None, "n": 1}, ceiling)[1] == "the floor has no CI (n = 1)"
    assert K.estimate([0.2, float("nan"), None])["n"] == 1


# ------------------------------------------------------------------------------ faithfulness areas
def test_curve_areas_trapezoid_from_origin():
    sizes = C.FAITHFULNESS_SIZES
    perfect = C.curve_areas(sizes, [1.0] * len(sizes))
    # from (0, 0) to (0.01, 1): one triangle of area 0.005 missing
    assert perfect["auc"] == pytest.approx(1 - 0.005) and perfect["distance"] == pytest.approx(0.005)
    linear = C.curve_areas([50, 100], [0.5, 1.0])
    assert linear["auc"] == pytest.approx(0.5) and linear["distance"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="increase"):
        C.curve_areas([50, 20], [1, 1])


# ------------------------------------------------------------------------------ on a tiny model
@pytest.fixture(scope="module")
def tiny():
    from clipmech.models import HookedCLIP
    from clipmech.models.configs import resolve_config
    torch.manual_seed(0)
    _, cfg = resolve_config("tiny-rn")
    model = HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=32))).double()
    g = torch.Generator().manual_seed(1)
    head = F.normalize(torch.randn(4, 64, generator=g, dtype=torch.double), dim=-1)
    images = {(d, k): torch.randn(2, 3, 32, 32, generator=g, dtype=torch.double) for d in "ab" for k in range(3)}
    return model, head, images


def test_faithfulness_curve_endpoints_and_masks(tiny):
    model, head, images = tiny
    circuit = C.discover_circuit(model, images["a", 0], torch.zeros(2, dtype=torch.long), head, steps=2)
    pts = [p for p in circuit.points if not p.endswith("hook_input")]
    masks = C.top_fraction_masks(circuit, 10, pts)
    assert all(int(m.sum()) == math.ceil(0.1 * len(m)) for m in masks.values())
    assert all(bool(C.top_fraction_masks(circuit, 100, pts)[p].all()) for p in pts)
    held = images["a", 1]
    fill = C.ablation_values(model, torch.cat([images["a", k] for k in range(3)]), pts)
    r = C.faithfulness_curve(model, circuit, held, torch.zeros(2, dtype=torch.long), head, fill=fill, eps=0)
    assert r["f"][-1] == pytest.approx(1.0) and len(r["f"]) == 7
    assert r["auc"] == pytest.approx(C.curve_areas(C.FAITHFULNESS_SIZES, r["f"])["auc"])
    skipped = C.faithfulness_curve(model, circuit, held, torch.zeros(2, dtype=torch.long), head, fill=fill, eps=1e9)
    assert skipped["f"] is None and "eps" in skipped["skipped"]
    donors = C.resample_values(model, images["a", 2], pts)
    assert all(v.shape[0] == 2 for v in donors.values())
    r2 = C.faithfulness_curve(model, circuit, held, torch.zeros(2, dtype=torch.long), head, fill=donors, eps=0)
    assert r2["f"][-1] == pytest.approx(1.0)


def test_matched_causal_test_runs_and_counts(tiny):
    model, head, images = tiny
    disc = {d: {k: C.discover_circuit(model, images[d, k][:1], torch.tensor([k]), head, steps=2) for k in range(3)}
            for d in "ab"}
    held = {k: (images["a", k][1:], torch.tensor([k])) for k in range(3)}
    held[3] = (images["a", 0][:0], torch.zeros(0, dtype=torch.long))
    res = K.matched_causal_test(model, disc, "a", held, head, reference=torch.cat([images["a", k] for k in range(3)]),
                                n_draws=2)
    assert res["skipped"]["3"] == "no discovery circuit in the test domain"
    assert len(res["classes"]) + len(res["skipped"]) == 4
    for c in res["per_class"].values():
        assert c["effect_logit"] == pytest.approx(c["drop_shared"][1] - c["drop_control"][1])
        assert 0 <= c["trimmed_fraction"] <= 1
    assert res["effect_logit"]["n"] == len(res["classes"])
    assert res["verdict"] == K.causal_verdict([c["effect_logit"] for c in res["per_class"].values()])


def test_causal_verdict_rule_and_its_boundaries():
    assert K.causal_verdict([0.1, 0.2, 0.05])["verdict"] == "reproduced"  # every resample mean > 0: p* = 0
    assert K.causal_verdict([-0.1, -0.2, -0.05])["verdict"] == "contradicted"
    zero = K.causal_verdict([0.0, 0.0, 0.0])  # exactly 0: p* = 1/2 (mid-p), not a positive verdict
    assert (zero["verdict"], zero["p_star"]) == ("inconclusive", 0.5)
    assert K.causal_verdict([0.3])["verdict"] == "no CI (one class)" and K.causal_verdict([])["verdict"] == "not measured"
    mixed = [0.3, -0.1, 0.2, 0.05, -0.02]
    assert len({K.causal_verdict(mixed, seed=s)["verdict"] for s in range(3)}) == 1
