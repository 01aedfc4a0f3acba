"""The study's statistics: the verdict rule's boundaries, mid-p ties, Holm, adaptive resampling,
the one-level scipy CI, and the crossed / clustered resampling designs (no model counted twice)."""
import numpy as np
import pytest
from scipy import stats

from clipmech.analysis import bootstrap as B
from clipmech.study import stats as S

A2 = 0.025  # alpha / 2 for alpha = 0.05


@pytest.mark.parametrize("p, se, verdict", [
    (A2, 0.0, B.BORDERLINE),              # exactly at the threshold
    (A2 - 1e-9, 0.0, B.REPRODUCED),       # just below
    (A2 + 1e-9, 0.0, B.INCONCLUSIVE),     # just above
    (1 - A2 + 1e-9, 0.0, B.CONTRADICTED),
    (1 - A2 + 0.0021, 0.001, B.CONTRADICTED),
    (0.5, 0.01, B.INCONCLUSIVE),
])
def test_decision_rule_boundaries(p, se, verdict):
    assert B.decide(p, se) == verdict


@pytest.mark.parametrize("p, verdict", [
    (2 ** -5 - 2 ** -9, B.BORDERLINE),            # p + 2 SE == alpha/2 exactly: not clear of the band
    (2 ** -5 - 2 ** -9 - 2 ** -20, B.REPRODUCED),  # just clear of it
    (2 ** -5 + 2 ** -9, B.BORDERLINE),             # |p - alpha/2| == 2 SE from above
    (2 ** -5 + 2 ** -9 + 2 ** -20, B.INCONCLUSIVE),
    (1 - 2 ** -5 + 2 ** -9, B.BORDERLINE),         # the opposite tail
    (1 - 2 ** -5 + 2 ** -9 + 2 ** -20, B.CONTRADICTED),
])
def test_decision_rule_band_edges_with_monte_carlo_error(p, verdict):
    # alpha = 2^-4 and SE = 2^-10 make every sum exact in floating point, so the edge is hit exactly.
    assert B.decide(p, 2 ** -10, alpha=2 ** -4) == verdict


def test_tail_probability_counts_ties_at_zero_as_half():
    assert B.tail_probability(np.array([-1.0, 0.0, 0.0, 1.0])) == (0.5, pytest.approx(np.sqrt(0.25 / 4)))
    p, se = B.tail_probability(np.array([0.0] + [0.1] * 39))
    assert p == pytest.approx(0.5 / 40) and se == pytest.approx(np.sqrt(p * (1 - p) / 40))
    assert B.tail_probability(np.array([0.0, np.nan, 0.0]))[0] == 0.5  # NaN resamples are not counted
    assert B.decide(*B.tail_probability(np.zeros(1000))) == B.INCONCLUSIVE  # all ties: no sign
    with pytest.raises(ValueError, match="no finite bootstrap resample"):
        B.tail_probability(np.array([np.nan]))


def test_holm_known_answer_and_decision():
    adj, se = B.holm([0.01, 0.04, 0.03], [0.001, 0.002, 0.003])
    assert adj == pytest.approx([0.03, 0.06, 0.06]) and se == pytest.approx([0.003, 0.006, 0.006])
    assert B.holm([0.6, 0.9])[0] == pytest.approx([1.0, 1.0])  # capped at 1
    assert B.decide(0.015, 0.0) == B.REPRODUCED  # Holm in verdicts: tests/test_claims.py (decide_family)


def test_adaptive_bootstrap_draws_more_only_near_a_threshold():
    clear = B.adaptive_bootstrap(lambda rng, b: rng.normal(3.0, 1.0, b), n_boot=500, max_boot=8000)
    assert clear.size == 500
    # P(effect <= 0) = alpha/2 exactly: never clear, stops at the cap
    edge = B.adaptive_bootstrap(lambda rng, b: rng.normal(stats.norm.isf(A2), 1.0, b), n_boot=500, max_boot=8000)
    assert edge.size == 8000
    with pytest.raises(ValueError, match="n_boot <= max_boot"):
        B.adaptive_bootstrap(lambda rng, b: rng.normal(size=b), n_boot=10, max_boot=5)


def test_bootstrap_ci_is_scipys_percentile_interval():
    x = np.random.default_rng(0).normal(size=25)
    ref = stats.bootstrap((x,), np.mean, n_resamples=999, method="percentile", rng=np.random.default_rng(3))
    assert B.bootstrap_ci(x, n_boot=999, seed=3) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high))
    assert B.bootstrap_ci([1.0]) is None and B.bootstrap_ci([2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="1 of 3 values are not finite"):
        B.bootstrap_ci([1.0, np.nan, 2.0])


def test_weighted_spearman_equals_scipy_on_the_expanded_sample():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 4, 10).astype(float), rng.integers(0, 3, 10).astype(float)  # many ties
    w = rng.integers(0, 3, 10).astype(float)
    expected = stats.spearmanr(np.repeat(x, w.astype(int)), np.repeat(y, w.astype(int))).statistic
    assert S.weighted_spearman(x[None], y[None], w[None])[0] == pytest.approx(expected)
    assert np.isnan(S.weighted_spearman(np.ones((1, 4)), y[None, :4], np.ones((1, 4))))[0]


def _row(setup, seed, domain, per_class, share=0.0, **kw):
    return {"setup": setup, "seed": seed, "test_domain": domain, "c2_test_acc": float(np.mean(list(per_class.values()))),
            "c2_test_acc_per_class": per_class, "cka_mid": share, **kw}


def test_contrast_counts_natural_only_once_and_pools_domains():
    rows = [_row("natural_only", s, d, {"a": 0.0, "b": 0.0}) for s in (0, 1) for d in ("x", "y")]
    rows += [_row("lod", s, d, {"a": 1.0, "b": float(d == "x")}) for s in (0, 1) for d in ("x", "y")]
    c = S.contrast(rows, "lod", "natural_only")
    assert c["n_models"] == 6 and c["n_seeds"] == 2 and c["n_domains"] == 2 and c["n_classes"] == 2
    assert c["estimate"] == pytest.approx(0.75)  # mean over domains (1.0, 0.5)
    assert c["resampled"] == ["seeds", "classes"]


def test_one_class_draw_applies_to_every_model():
    # Identical per-class accuracies in both setups: every crossed resample gives 0 exactly; a design
    # that drew classes per model would not.
    pc = {f"k{i}": float(i % 2) for i in range(10)}
    rows = [_row(s, seed, "x", pc) for s in ("lod", "cg_low") for seed in range(3)]
    c = S.contrast(rows, "lod", "cg_low", n_boot=500, max_boot=500)
    assert (c["ci_low"], c["ci_high"], c["p_star"]) == (0.0, 0.0, 0.5)


def test_correlation_resamples_a_model_as_one_cluster():
    rng = np.random.default_rng(2)
    base = [(rng.random(), {"a": rng.random(), "b": rng.random()}) for _ in range(8)]
    one = [_row("lod", i, "x", pc, share=x, model_id=f"m{i}") for i, (x, pc) in enumerate(base)]
    # The same 8 models scored on a second domain with the same values: one cluster each, so the
    # bootstrap distribution is that of one domain, not a narrower one from 16 "models".
    two = one + [dict(r, test_domain="y") for r in one]
    c1, c2 = (S.correlation(r, "cka_mid", n_boot=1000, max_boot=1000, seed=5) for r in (one, two))
    assert c2["n_models"] == 8 and c2["n"] == 16 and c2["n_domains"] == 2
    assert (c2["estimate"], c2["ci_low"], c2["ci_high"]) == pytest.approx((c1["estimate"], c1["ci_low"], c1["ci_high"]))
    distinct = [dict(r, model_id=r["model_id"] + "-y") for r in two[8:]]
    c3 = S.correlation(one + distinct, "cka_mid", n_boot=1000, max_boot=1000, seed=5)
    assert c3["n_models"] == 16 and c3["ci_high"] - c3["ci_low"] < c2["ci_high"] - c2["ci_low"]


def test_correlation_estimate_is_mean_of_within_domain_spearman_and_centred_variant():
    rng = np.random.default_rng(3)
    rows = []
    for d in ("x", "y"):
        for i in range(6):
            setup = "lod" if i < 3 else "cg_low"
            acc = rng.random()
            rows.append(_row(setup, i, d, {"a": acc, "b": acc}, share=acc + rng.normal() * 0.3))
    c = S.correlation(rows, "cka_mid", n_boot=200, max_boot=200)
    ref = np.mean([stats.spearmanr([r["cka_mid"] for r in rows if r["test_domain"] == d],
                                   [r["c2_test_acc"] for r in rows if r["test_domain"] == d]).statistic
                   for d in ("x", "y")])
    assert c["estimate"] == pytest.approx(ref)
    cen = S.correlation(rows, "cka_mid", centred=True, n_boot=200, max_boot=200)
    ref_c = []
    for d in ("x", "y"):
        sub = [r for r in rows if r["test_domain"] == d]
        m = {s: (np.mean([r["cka_mid"] for r in sub if r["setup"] == s]),
                 np.mean([r["c2_test_acc"] for r in sub if r["setup"] == s])) for s in ("lod", "cg_low")}
        ref_c.append(stats.spearmanr([r["cka_mid"] - m[r["setup"]][0] for r in sub],
                                     [r["c2_test_acc"] - m[r["setup"]][1] for r in sub]).statistic)
    assert cen["estimate"] == pytest.approx(np.mean(ref_c))


def test_correlation_skips_undefined_domains_with_a_reason():
    rows = [_row("lod", i, "x", {"a": 0.5}, share=0.1 * i) for i in range(4)]
    rows += [_row("lod", i, "y", {"a": 0.1 * i}, share=0.1 * i) for i in range(2)]
    c = S.correlation(rows, "cka_mid", n_boot=100, max_boot=100)
    assert c["rho"] is None and "constant" in c["skipped_domains"]["x"] and "need at least 3" in c["skipped_domains"]["y"]
    assert c["reason"]


def _causal_row(setup, seed, domain, effects, model_id=None):
    """A row with per-class causal effects {class: (logit effect, accuracy effect)}."""
    per_class = {k: {"effect_logit": lg, "effect_accuracy": acc} for k, (lg, acc) in effects.items()}
    row = {"setup": setup, "seed": seed, "test_domain": domain, "controls": {"causal": {"per_class": per_class}}}
    return row | ({"model_id": model_id} if model_id else {})


def test_causal_effects_known_answer_and_rows_without_effects():
    rows = [_causal_row("lod", s, "x", {"a": (0.1 * (s + 1), 0.0), "b": (0.2, 1.0)}) for s in range(3)]
    rows += [_causal_row("lod", s, "y", {"a": (0.5, 0.5)}) for s in range(3)]
    rows += [{"setup": "lod", "seed": 9, "test_domain": "x"},  # schema-1 row: no controls
             _causal_row("lod", 8, "x", {})]  # every class skipped
    e = S.causal_effects(rows, "logit", n_boot=500, max_boot=500)
    # mean over domains of the mean over models and classes: x (0.1+0.2+0.3+3*0.2)/6 = 0.2, y 0.5
    assert e["estimate"] == pytest.approx(0.35) and e["n_dropped"] == 2 and e["n_rows"] == 6
    assert e["n_models"] == 6 and e["n_classes"] == 2 and e["n_domains"] == 2
    assert e["resampled"] == ["models", "classes"] and e["p_star"] == 0.0 and 0 < e["ci_low"] < e["ci_high"]
    acc = S.causal_effects(rows, "accuracy", n_boot=500, max_boot=500)
    assert acc["estimate"] == pytest.approx((0.5 + 0.5) / 2)
    none = S.causal_effects(rows[-2:], "logit")
    assert none["estimate"] is None and none["p_star"] is None and "per-class causal effects" in none["reason"]
    with pytest.raises(ValueError, match="two rows of model 'lod-x-s0' on test domain 'x'"):
        S.causal_effects(rows[:1] * 2, "logit")
    with pytest.raises(ValueError, match="'logit' or 'accuracy'"):
        S.causal_effects(rows, "drop")


def test_causal_effects_resample_a_model_on_two_domains_as_one_cluster():
    rng = np.random.default_rng(3)
    one = [_causal_row("natural_only", i, "x", {k: (rng.normal(0.05, 0.1), 0.0) for k in "abc"}, model_id=f"m{i}")
           for i in range(8)]
    two = one + [dict(r, test_domain="y") for r in one]  # the same models on a second domain
    e1, e2 = (S.causal_effects(r, n_boot=1000, max_boot=1000, seed=4) for r in (one, two))
    assert e2["n_models"] == 8 and e2["n_rows"] == 16
    assert (e2["estimate"], e2["ci_low"], e2["ci_high"]) == pytest.approx((e1["estimate"], e1["ci_low"], e1["ci_high"]))
    distinct = S.causal_effects(one + [dict(r, model_id=r["model_id"] + "-y") for r in two[8:]], n_boot=1000,
                                max_boot=1000, seed=4)
    assert distinct["n_models"] == 16 and distinct["ci_high"] - distinct["ci_low"] < e2["ci_high"] - e2["ci_low"]
