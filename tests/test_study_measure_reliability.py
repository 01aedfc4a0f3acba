"""Sharedness measures (issue 26): reliability recovered on simulated rows, attenuation correction,
the class-bootstrap SE, same-pair ceilings and the class-contrastive metric."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipmech.analysis import controls as K
from clipmech.analysis.circuit_similarity import node_jaccard
from clipmech.analysis.circuits import Circuit
from clipmech.analysis.metrics import class_contrastive_logit
from clipmech.study import measure_reliability as M


@pytest.mark.parametrize("true_var, noise_var", [(1.0, 1.0), (1.0, 0.25), (0.2, 1.0)])
def test_reliability_recovers_a_known_true_share_within_005(true_var, noise_var):
    rng = np.random.default_rng(0)
    n = 4000
    se = np.sqrt(noise_var * rng.uniform(0.5, 1.5, n))  # heteroscedastic, mean SE^2 = noise_var
    scores = rng.normal(0, np.sqrt(true_var), n) + rng.normal(0, se)
    res = M.reliability(scores, se)
    assert res["reliability"] == pytest.approx(true_var / (true_var + noise_var), abs=0.05)
    assert res["flagged"] == (true_var / (true_var + noise_var) < 0.5)


def test_reliability_flag_boundary_and_undefined_cases():
    scores = [0.0, 1.0, 1.0, 1.0, 2.0]  # Var = 0.5 exactly; SE 0.5 -> mean SE^2 = 0.25: reliability 0.5 exactly
    at = M.reliability(scores, [0.5] * 5)
    assert at["reliability"] == 0.5 and not at["flagged"]  # at the minimum: not below it
    assert M.reliability(scores, [0.5] * 4 + [0.51])["flagged"]
    assert M.reliability([1.0, 1.0, 1.0], [0.1] * 3)["reason"] == "the score does not vary across rows"
    short = M.reliability([1.0, None, 2.0], [0.1, 0.1, None])
    assert short["reliability"] is None and short["n_dropped"] == 2 and "need 3" in short["reason"]


def test_disattenuated_correlation_and_class_bootstrap_se():
    assert M.disattenuated(0.3, 0.36) == pytest.approx(0.5)
    assert M.disattenuated(0.3, 0.25, 0.36) == pytest.approx(0.3 / 0.3)
    assert M.disattenuated(0.3, 0.0) is None and M.disattenuated(None, 0.5) is None
    v = np.random.default_rng(1).normal(size=400)
    assert M.class_bootstrap_se(v) == pytest.approx(v.std() / np.sqrt(v.size), rel=0.1)
    assert M.class_bootstrap_se([1.0]) is None


def _circ(rng, n=40, k=8):
    return Circuit(["p"], {"p": torch.zeros(n)}, {"p": rng.choice(n, k, replace=False).tolist()}, [])


def test_ceiling_on_the_score_pairs_does_not_pool_other_domains():
    rng = np.random.default_rng(0)
    sim = lambda a, b: float(np.mean(list(node_jaccard(a, b).values())))  # noqa: E731
    circuits = {d: {c: _circ(rng) for c in range(6)} for d in ("t", "u", "v")}
    repeats = {"t": circuits["t"], "u": circuits["u"], "v": {c: _circ(rng) for c in range(6)}}  # v: noisy retest
    res = K.circuit_nulls(circuits, repeats, "t", sim)
    r_v = [sim(circuits["v"][c], repeats["v"][c]) for c in range(6)]
    assert res["ceiling"]["mean"] == pytest.approx(np.mean([(2 + r) / 3 for r in r_v]))  # pools t, u, v
    assert res["ceiling_pairs"]["mean"] == pytest.approx(np.mean([(1 + (1 + r) / 2) / 2 for r in r_v]))
    assert len(res["score"]["per_class"]) == 6
    assert K.circuit_nulls(circuits, {}, "t", sim)["ceiling_pairs"]["mean"] is None


def test_class_contrastive_logit_known_answer():
    head = torch.eye(3)
    emb = torch.tensor([[3.0, 4.0, 0.0]])  # cosine logits 0.6, 0.8, 0
    assert float(class_contrastive_logit(head, [0])(emb)) == pytest.approx(0.6 - 0.4)
    assert float(class_contrastive_logit(head, [1])(emb)) == pytest.approx(0.8 - 0.3)
