"""The causal test of issue 26: sets, matching, balance, randomisation rank, sign-flip inference,
the verdict at its boundaries, the batched ablation's parity and the drawing-leak guard."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmech.analysis import causal as K
from clipmech.analysis import circuits as C
from clipmech.analysis.patching import cosine_logits
from clipmech.data.dataset import DomainDataset
from clipmech.data.samples import check_disjoint_drawings


def _circ(nodes: dict[str, list[int]], n: int = 10) -> C.Circuit:
    return C.Circuit(list(nodes), {p: torch.zeros(n) for p in nodes}, {p: list(v) for p, v in nodes.items()}, [])


# ----------------------------------------------------------------------------------------- sets
def test_derangements_are_fixed_point_free_distinct_and_seeded():
    for n in (2, 3, 5, 8, 15):
        ps = K.derangements(n, 5, seed=1)
        assert len(ps) == {2: 1, 3: 2}.get(n, 5)
        assert all((p != np.arange(n)).all() and sorted(p) == list(range(n)) for p in ps)
        assert len({tuple(p) for p in ps}) == len(ps)
        assert [tuple(p) for p in ps] == [tuple(p) for p in K.derangements(n, 5, seed=1)]
    with pytest.raises(ValueError, match="at least 2"):
        K.derangements(1, 5)


def test_shared_and_placebo_sets_on_hand_made_circuits():
    circuits = {"t": {0: _circ({"p": [1, 2, 3, 4]}), 1: _circ({"p": [5]})},
                "a": {0: _circ({"p": [1, 9]}), 1: _circ({"p": [2, 3]})},
                "b": {0: _circ({"p": [3]}), 1: _circ({"p": [4, 1]})}}
    assert K.shared_set(circuits, "t", 0, ["p"]) == {"p": [1, 3]}
    # in another domain's class-1 circuit (2, 3, 4, 1) and in no other class-0 circuit (1, 9, 3)
    assert K.placebo_set(circuits, "t", 0, 1, ["p"]) == {"p": [2, 4]}
    with pytest.raises(ValueError, match="must differ"):
        K.placebo_set(circuits, "t", 0, 0, ["p"])


def test_random_sets_match_size_layer_mix_and_strata_including_the_top():
    rng = np.random.default_rng(0)
    scores = {"p": torch.arange(40.0), "q": torch.arange(20.0).flip(0)}
    target = {"p": [39, 38, 37, 36, 5], "q": [0, 1]}  # piled up in the top stratum of each point
    m = K.matched_random_sets(target, scores, 4, 30, rng)
    assert m["unmatched"] == [0, 0, 0, 0]
    for s in m["sets"]:
        assert {p: len(v) for p, v in s.items()} == {"p": 5, "q": 2}
        assert not set(s["p"]) & set(target["p"]) and not set(s["q"]) & set(target["q"])
        for p in s:
            assert sorted(m["strata"][p][s[p]]) == sorted(m["strata"][p][target[p]])
    # a top stratum of 10 nodes holding 8 target nodes leaves 2 candidates: 6 unmatched, sets smaller there
    short = K.matched_random_sets({"p": list(range(32, 40))}, {"p": torch.arange(40.0)}, 4, 5, rng)
    assert short["unmatched"] == [0, 0, 0, 6] and all(len(s["p"]) == 2 for s in short["sets"])


# -------------------------------------------------------------------------------------- balance
def test_standardised_mean_difference_hand_computed_and_its_limit():
    # a = [1, 2, 3] (mean 2, var 1), b = [2, 3, 4, 5] (mean 3.5, var 5/3): SMD = -1.5 / sqrt(4/3)
    assert K.standardized_mean_difference([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(-1.5 / np.sqrt(4 / 3))
    assert K.standardized_mean_difference([1, 1], [1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="infinite"):
        K.standardized_mean_difference([1, 1], [2, 2])
    # exactly at the limit: shift 0.1 of a pooled SD of 1 -> balanced (<= 0.1), just above -> not
    a = np.array([-1.0, 1.0]) * np.sqrt(0.5)
    assert abs(K.standardized_mean_difference(a + 0.1, a)) == pytest.approx(0.1)
    # set_balance z-scores within each point first: a point's scale does not matter
    scores = {"p": torch.tensor([0.0, 1, 2, 3]), "q": 1000 * torch.tensor([0.0, 1, 2, 3])}
    assert K.set_balance({"p": [0, 3]}, [{"p": [1, 2]}], scores) == pytest.approx(0.0)
    assert K.set_balance({"p": [1, 2], "q": [1, 2]}, [{"p": [0, 3], "q": [0, 3]}], scores) == pytest.approx(0.0)
    # a one-node set against controls that all drew the same other node: infinite SMD -> None (unbalanced),
    # found in the default quickstart, where it used to stop the whole run; the same node -> 0
    assert K.set_balance({"p": [0]}, [{"p": [1]}, {"p": [1]}], scores) is None
    assert K.set_balance({"p": [1]}, [{"p": [1]}, {"p": [1]}], scores) == 0.0


# ------------------------------------------------------------------------------------ inference
def test_randomisation_rank_on_a_constructed_case():
    null = np.arange(199.0)  # 0..198
    assert K.randomisation_rank(1000.0, null) == {"rank": 1, "n": 199, "p": 1 / 200, "side": "greater"}
    assert K.randomisation_rank(198.0, null)["rank"] == 2  # a tie counts against the observed
    assert K.randomisation_rank(-1.0, null)["p"] == 1.0


def test_sign_flip_test_exact_values_and_boundaries():
    assert K.sign_flip_test([0.1, 0.3, 0.2, 0.5, 0.4])["p"] == 1 / 32  # five classes cannot beat 1/32
    assert K.sign_flip_test([0.2] * 8)["p"] == 1 / 256 and K.sign_flip_test([0.2] * 8)["min_p"] == 1 / 256
    zero = K.sign_flip_test([0.0] * 8)
    assert zero["p"] == 1.0 and zero["p_opposite"] == 1.0
    x = np.array([0.5, -0.1, 0.3, 0.2, -0.4, 0.05])
    brute = np.mean([float((np.array(s) * x).sum() >= x.sum() - 1e-12)
                     for s in np.array(np.meshgrid(*[[-1, 1]] * 6)).reshape(6, -1).T])
    assert K.sign_flip_test(x)["p"] == pytest.approx(brute)
    assert K.sign_flip_test([0.2] * 17)["p"] == 2 ** -17  # 2^17 sign vectors: enumerated in two blocks
    mc = K.sign_flip_test([0.2] * 8, exact_max=4, n_mc=20000)
    assert not mc["exact"] and abs(mc["p"] - 1 / 256) < 0.003


def _result(primaries: dict[str, float], shared: float = 0.5, balanced: bool = True) -> dict:
    cls = {}
    for k, v in primaries.items():
        eff = {o: {"effect": shared, "randomisation": {"p": 0.01}} for o in K.OUTCOMES}
        cls[k] = {"primary": {"mean": {o: v for o in K.OUTCOMES}}, "balanced": balanced,
                  "shared": {"mean": eff}, "strata": [{"stratum": z, "size": 3, "unmatched": int(z == 3),
                                                        "mean": eff} for z in range(4)]}
    return {"classes": cls}


def test_causal_finding_placebo_equal_to_shared_is_not_reproduced_and_planted_effect_is():
    classes = [f"c{i}" for i in range(8)]
    same = K.causal_finding([_result({k: 0.0 for k in classes}) for _ in range(3)])  # placebo effect = shared
    assert same["verdict"] == "inconclusive" and same["p"] == 1.0
    planted = K.causal_finding([_result({k: 0.3 + 0.01 * i for i, k in enumerate(classes)}) for _ in range(3)])
    assert planted["verdict"] == "reproduced" and planted["p"] == 1 / 256 and "warning" not in planted
    assert planted["strata"][3]["unmatched"] == 3 * 8 and planted["strata"][3]["effect"] == pytest.approx(0.5)
    against = K.causal_finding([_result({k: -0.3 for k in classes})])
    assert against["verdict"] == "contradicted"
    five = K.causal_finding([_result({k: 0.3 for k in classes[:5]})])  # 1/32 > alpha/2: not reproducible
    assert five["verdict"] == "inconclusive" and "2^-5" in five["warning"]
    # class effects are averaged over models first: one model +1, another -0.2 on every class -> +0.4
    avg = K.causal_finding([_result({k: 1.0 for k in classes}), _result({k: -0.2 for k in classes})])
    assert avg["estimate"] == pytest.approx(0.4) and avg["per_class"]["c0"]["n_models"] == 2


def test_unbalanced_classes_are_excluded_and_counted():
    classes = [f"c{i}" for i in range(8)]
    ok, bad = _result({k: 0.3 for k in classes}), _result({k: 0.3 for k in classes}, balanced=False)
    res = K.causal_finding([ok, bad])
    assert res["excluded"]["unbalanced"] == 8 and all(m["n_models"] == 1 for m in res["per_class"].values())
    none = K.causal_finding([bad])
    assert none["verdict"] == "not measured" and none["excluded"]["unbalanced"] == 8


# --------------------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def tiny():
    from clipmech.models import HookedCLIP
    from clipmech.models.configs import resolve_config
    torch.manual_seed(0)
    _, cfg = resolve_config("tiny-rn")
    model = HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=32))).double().eval()
    g = torch.Generator().manual_seed(1)
    head = F.normalize(torch.randn(3, 64, generator=g, dtype=torch.double), dim=-1)
    images = {(d, k): torch.randn(2, 3, 32, 32, generator=g, dtype=torch.double) for d in "tab" for k in range(3)}
    return model, head, images


def test_outcomes_known_answer():
    got = K._outcomes(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.1, 0.2]], dtype=torch.double), torch.tensor([0, 0]))
    assert got.flatten().tolist() == pytest.approx([0.0, 0.5, -0.4, 1.0, 0.3, 0.1])


def test_batched_set_ablation_equals_one_ablation_per_set(tiny):
    model, head, images = tiny
    pts = [p for p in model.analysis_points() if not p.endswith("hook_input")][:3]
    x, y = images["t", 0], torch.zeros(2, dtype=torch.long)
    fill = C.ablation_values(model, torch.cat([images["t", k] for k in range(3)]), pts)
    donors = C.resample_values(model, images["t", 1], pts)
    spaces = {p: len(fill[p]) if fill[p].ndim == 1 else fill[p].shape[-1] for p in pts}
    sets = [{}, {pts[0]: [0, 3]}, {pts[1]: [1], pts[2]: [0, 2, 5]}]
    for f in (fill, donors):
        got = K.set_ablation_outcomes(model, x, y, head, sets, f, spaces, batch=4)  # 2 sets per forward
        for s, row in zip(sets, got):
            keep = {p: torch.ones(spaces[p], dtype=torch.bool) for p in pts}
            for p, v in s.items():
                keep[p][v] = False
            logits = cosine_logits(C.ablated_embedding(model, x, keep, fill=f), head).double()
            assert row == pytest.approx(K._outcomes(logits, y).mean(0).numpy(), abs=1e-9)


def test_causal_test_runs_end_to_end_and_counts(tiny):
    model, head, images = tiny
    pts = [p for p in model.analysis_points() if not p.endswith("hook_input")]
    sizes = {p: v.shape[-1] for p, v in C.ablation_values(model, images["t", 0], pts).items()}
    g = torch.Generator().manual_seed(2)
    # circuits without IG (the test is about sets, matching and ablation): random top-10 % node sets
    disc = {d: {k: C.Circuit(pts, {p: torch.rand(n, generator=g) for p, n in sizes.items()},
                             {p: torch.randperm(n, generator=g)[:max(1, n // 10)].tolist() for p, n in sizes.items()}, [])
                for k in range(3)} for d in "tab"}
    match = {k: {p: torch.rand(n, generator=g) for p, n in sizes.items()} for k in range(3)}
    balance = {k: {p: torch.rand(n, generator=g) for p, n in sizes.items()} for k in range(3)}
    mean = C.ablation_values(model, torch.cat([images["t", k] for k in range(3)]), pts)
    fills = {k: {"mean": mean, "resample": C.resample_values(model, images["t", (k + 1) % 3][1:], pts)} for k in range(3)}
    held = {k: (images["t", k][1:], torch.tensor([k])) for k in range(3)}
    held[7] = (images["t", 0][:0], torch.zeros(0, dtype=torch.long))
    opts = K.CausalOptions(n_random=5, n_random_small=2, n_strata=2, n_derangements=2)
    res = K.causal_test(model, disc, "t", held, head, match_scores=match, balance_scores=balance, fills=fills,
                        points=pts, opts=opts)
    assert res["skipped"]["7"] == "no discovery circuit in the test domain"
    assert len(res["classes"]) + len(res["skipped"]) == 4 and len(res["derangements"]) == 2
    for k, c in res["classes"].items():
        sh = c["shared"]
        assert sh["size"] == sum(len(v) for v in K.shared_set(disc, "t", int(k), pts).values())
        assert sum(s["size"] for s in c["strata"]) == sh["size"]  # every shared node is in one stratum: none trimmed
        for how in ("mean", "resample"):
            e = sh[how]["logit"]
            assert e["effect"] == pytest.approx(e["drop"] - e["control"])
            assert e["randomisation"]["n"] == 5
            used = [p for p in c["placebo"] if p is not None]
            want = e["effect"] - np.mean([p[how]["logit"]["effect"] for p in used]) if used else None
            assert c["primary"][how]["logit"] == (pytest.approx(want) if used else None)
        assert c["balanced"] == (c["max_abs_smd"] is not None and c["max_abs_smd"] <= 0.1)
    finding = K.causal_finding([res], ablation="resample", outcome="margin")
    assert finding["n_classes"] + sum(finding["excluded"].values()) == len(res["classes"])
    null = K.balance_summary([res], "resample", "margin")["randomisation_all_pairs"]
    ranks = [c["shared"]["resample"]["margin"]["randomisation"]["p"] for c in res["classes"].values()]
    assert null["n"] == len(res["classes"]) and null["n_null"] == [5]
    assert null["median_p"] == pytest.approx(np.median(ranks)) and min(ranks) >= 1 / 6  # rank p >= 1 / (n + 1)


# ------------------------------------------------------------------------------------ leak guard
def _drawings(**kw) -> DomainDataset:
    rng = np.random.default_rng(0)
    n = 6
    return DomainDataset("toy", ["real", "sketch"], ["a", "b"], domain_idx=[0] * n, class_idx=[0, 0, 0, 1, 1, 1],
                         split=["train"] * 3 + ["test"] * 3, **kw) if "sources" in kw else DomainDataset(
        "toy", ["real", "sketch"], ["a", "b"], domain_idx=[0] * n, class_idx=[0, 0, 0, 1, 1, 1],
        split=["train"] * 3 + ["test"] * 3, images=rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8), **kw)


def test_leak_guard_fires_on_a_leaked_drawing_and_passes_disjoint_ones():
    styled = _drawings(extras={"style_idx": np.array([0, 0, 2, 0, 1, 2]), "view_idx": np.array([0, 1, 0, 0, 0, 0])})
    check_disjoint_drawings(styled, [0], [2])  # class a: style 0 vs style 2
    with pytest.raises(ValueError, match=r"1 ablation drawing\(s\) also used for discovery.*style \(0, 0\)"):
        check_disjoint_drawings(styled, [0], [1, 2])  # row 1: another view of row 0's drawing (other pixels)
    check_disjoint_drawings(styled, [0], [3])  # same style, other class: a different drawing
    plain = _drawings()
    plain.images[4] = plain.images[0]  # one image stored twice, under two classes
    with pytest.raises(ValueError, match="pixels"):
        check_disjoint_drawings(plain, [0, 1], [4, 5])
    files = _drawings(sources=[f"/d/{i % 3}.png" for i in range(6)], root="/d")
    with pytest.raises(ValueError, match="source"):
        check_disjoint_drawings(files, [0], [3])
    check_disjoint_drawings(files, [0], [4])


def test_balance_summary_counts_every_pair_and_its_boundaries():
    """Known answer over 2 models x 2 classes: an SMD exactly at the limit is within it, a None (infinite)
    SMD is counted, and the per-stratum effects average every pair, balanced or not."""
    def cls(smd, placebo, balanced, effects):
        return {"balanced": balanced, "shared": {"balance_smd": smd}, "placebo": [placebo, None],
                "strata": [{"stratum": z, "mean": {"logit": {"effect": e}}} for z, e in enumerate(effects)]}
    models = [{"classes": {"a": cls(0.1, {"balance_smd": -0.2}, True, [0.0, 1.0]),
                           "b": cls(0.5, {"balance_smd": None}, False, [0.2, 3.0])}},
              {"classes": {"a": cls(-0.3, {"balance_smd": 0.4}, False, [0.4, 2.0]),
                           "b": cls(None, None, False, [0.6])}}]
    b = K.balance_summary(models, "mean", "logit", limit=0.1)
    assert (b["n_pairs"], b["n_balanced"], b["infinite"]) == (4, 1, 2)
    assert b["shared_smd_quartiles"] == pytest.approx(list(np.percentile([0.1, 0.5, -0.3], [25, 50, 75])))
    assert b["shared_positive"] == pytest.approx(2 / 3) and b["shared_within_limit"] == pytest.approx(1 / 3)
    assert b["placebo_abs_smd_median"] == pytest.approx(0.3)
    assert b["strata_all_pairs"] == {0: {"effect": pytest.approx(0.3), "n": 4}, 1: {"effect": pytest.approx(2.0), "n": 3}}
    assert K.balance_summary([], "mean", "logit")["shared_smd_quartiles"] is None


def test_balance_summary_randomisation_null_over_all_pairs_and_its_boundary():
    """Rank p exactly 0.05 counts as <= 0.05; pairs without the ablation add no rank; unbalanced pairs count."""
    def cls(p, balanced, n=200, ablation="mean"):
        shared = {"balance_smd": 0.0, ablation: {"logit": {"randomisation": {"p": p, "n": n, "rank": 1}}}}
        return {"balanced": balanced, "shared": shared, "placebo": [], "strata": []}
    models = [{"classes": {"a": cls(0.05, True), "b": cls(0.0501, False), "c": cls(0.9, False, n=50)}},
              {"classes": {"a": cls(0.004, False), "b": cls(0.01, True, ablation="resample")}}]
    r = K.balance_summary(models, "mean", "logit")["randomisation_all_pairs"]
    assert r["n"] == 4 and r["n_null"] == [50, 200]
    assert r["median_p"] == pytest.approx(np.median([0.05, 0.0501, 0.9, 0.004]))
    assert r["share_p_le_0.05"] == pytest.approx(2 / 4)
    empty = K.balance_summary([], "mean", "logit")["randomisation_all_pairs"]
    assert empty == {"n": 0, "median_p": None, "share_p_le_0.05": None, "n_null": []}
