"""Claim logic of issue 26: exact Monte-Carlo bounds (Clopper-Pearson) in the decision band, p̂ = 0
written as "< 1/B", Holm on the side each claim's rule corrects."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from clipmech.analysis import bootstrap as B

BIG = 10 ** 7  # resamples so many that the Monte-Carlo band is negligible


def test_clopper_pearson_known_answers():
    lo, hi = B.clopper_pearson(0, 2000)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.005 ** (1 / 2000))  # closed form at k = 0, 99 %
    lo, hi = B.clopper_pearson(10, 100, 0.95)
    assert (lo, hi) == pytest.approx((stats.beta.ppf(0.025, 10, 91), stats.beta.ppf(0.975, 11, 90)))
    assert B.clopper_pearson(5, 5)[1] == 1.0
    with pytest.raises(ValueError, match="0 <= k <= n"):
        B.clopper_pearson(3, 2)
    # a mid-p half count is rounded outwards
    assert B.p_bounds(0.5 / 40, 40) == (B.clopper_pearson(0, 40)[0], B.clopper_pearson(1, 40)[1])


def test_p_hat_zero_is_reported_as_below_one_over_b_with_its_bound():
    text = B.format_p(0.0, 2000)
    assert text == f"p* < 1/2000 (99% Monte-Carlo bound {1 - 0.005 ** (1 / 2000):.4f})"
    assert "0.0000 ±" not in text
    assert B.format_p(0.02, 2000).startswith("p* = 0.0200 [")


def test_p_hat_zero_decides_by_its_bound_at_the_boundary():
    # 1 - 0.005^(1/B) < 0.025 first holds at B = 210: with fewer resamples p̂ = 0 is not enough
    edge = math.log(0.005) / math.log(0.975)
    assert 209 < edge < 210
    assert B.decide_family([0.0], [210]) == [B.REPRODUCED]
    assert B.decide_family([0.0], [209]) == [B.BORDERLINE]
    assert B.decide_family([1.0], [210]) == [B.CONTRADICTED]


def test_exact_p_at_half_alpha_is_borderline_not_reproduced():
    assert B.decide_family([0.025], [64000]) == [B.BORDERLINE]
    assert B.decide_family([0.02], [64000]) == [B.REPRODUCED]
    assert B.decide_family([0.5], [64000]) == [B.INCONCLUSIVE]


def test_holm_on_the_contradiction_side_of_all_claims():
    # two pieces, each contradicted on its raw tail (q = 0.015) but not after Holm (q_adj = 0.03)
    assert B.decide_family([0.985, 0.985], [BIG, BIG]) == [B.CONTRADICTED] * 2
    assert B.decide_family([0.985, 0.985], [BIG, BIG], correct="contradict") == [B.INCONCLUSIVE] * 2
    assert B.decide_family([0.985, 0.999], [BIG, BIG], correct="contradict") == [B.CONTRADICTED] * 2  # 0.002: 0.015
    # reproduction of an "all" claim needs no correction; of an "any" claim it does
    assert B.decide_family([0.015, 0.02], [BIG, BIG], correct="contradict") == [B.REPRODUCED] * 2
    assert B.decide_family([0.015, 0.02], [BIG, BIG], correct="reproduce") == [B.INCONCLUSIVE] * 2
    assert B.decide_family([0.0125, 0.02], [BIG, BIG], correct="reproduce")[0] == B.BORDERLINE  # adj 0.025
    with pytest.raises(ValueError, match="correct"):
        B.decide_family([0.1], [10], correct="sideways")
