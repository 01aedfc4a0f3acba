"""EAP-IG as the study's circuit method: the whole-tower circuit equals the segment-level EAP-IG scores
it is built from (nodes, selection, edges into the selected nodes), a point's node score is the same
from both segments it ends, and the option reaches the study's keys and report."""
import math

import pytest
import torch

from clipmech.analysis import discovery as D
from clipmech.analysis.ablation import ablation_values
from clipmech.analysis.edge_ablation import Segment
from clipmech.analysis.engine_adapter import true_class_logit
from clipmech.checks import ConfigError
from clipmech.models import HookedCLIP
from clipmech.study.plan import Preset
from clipmech.study.quickstart import QuickstartOptions


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = HookedCLIP.from_config("tiny-rn").eval().double()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.double)
    reference = torch.randn(5, 3, 64, 64, generator=gen, dtype=torch.double)
    head = torch.randn(4, model.cfg["embed_dim"], generator=gen, dtype=torch.double)
    return model, images, reference, head, torch.tensor([1, 1])


def test_circuit_equals_the_segment_scores_it_is_built_from(setting):
    model, images, reference, head, labels = setting
    pts = model.analysis_points()[-3:]
    c = D.eap_ig_circuit(model, images, labels, head, reference, points=pts, steps=4, node_fraction=0.25, top_k=2)
    assert c.points == pts and c.meta["method"] == "eap_ig" and c.meta["ablation"] == "mean"
    metric = true_class_logit(head, labels, reduce="sum")
    segs = [Segment.build(model, images, u, d, head, labels, metric, "mean", reference) for u, d in zip(pts, pts[1:])]
    full = [D.eap_ig_scores(s, 2) for s in segs]  # steps 4 -> 2 interpolation points, every edge
    # the middle point's score is the same as the first segment's downstream and the second's upstream
    torch.testing.assert_close(full[0][0][pts[1]], full[1][0][pts[1]], rtol=1e-9, atol=1e-12)
    expected_nodes = {pts[0]: full[0][0][pts[0]], pts[1]: full[1][0][pts[1]], pts[2]: full[1][0][pts[2]]}
    for p in pts:
        torch.testing.assert_close(c.node_scores[p], expected_nodes[p], rtol=1e-9, atol=1e-12)
        k = math.ceil(0.25 * len(expected_nodes[p]))
        assert c.nodes[p] == torch.argsort(expected_nodes[p], descending=True, stable=True)[:k].tolist()
    # edges: for every selected downstream node, its top-2 selected upstream nodes by the full matrix
    for (u, d), (_, edges) in zip(zip(pts, pts[1:]), full):
        mine = [e for e in c.edges if e[0] == u]
        assert len(mine) == 2 * len(c.nodes[d])
        for j in c.nodes[d]:
            row = edges[j, c.nodes[u]]
            top = [c.nodes[u][int(i)] for i in torch.argsort(row, descending=True, stable=True)[:2]]
            got = [e for e in mine if e[3] == j]
            assert [e[1] for e in got] == top
            assert [e[4] for e in got] == pytest.approx([float(edges[j, i]) for i in top], rel=1e-9)


def test_precomputed_fill_gives_the_same_circuit_and_nodes_only_has_no_edges(setting):
    model, images, reference, head, labels = setting
    pts = model.analysis_points()[-2:]
    a = D.eap_ig_circuit(model, images, labels, head, reference, points=pts, steps=2)
    b = D.eap_ig_circuit(model, images, labels, head, reference, points=pts, steps=2,
                         fill=ablation_values(model, reference, pts, "mean"), edges=False)
    assert a.nodes == b.nodes and b.edges == [] and b.meta["top_k"] == 0 and len(a.edges) == 3 * len(a.nodes[pts[1]])


def test_bad_arguments_are_refused(setting):
    model, images, reference, head, labels = setting
    with pytest.raises(ValueError, match="at least 2 points"):
        D.eap_ig_circuit(model, images, labels, head, reference, points=model.analysis_points()[-1:])
    with pytest.raises(ValueError, match=r"node_fraction must be in \(0, 1\]"):
        D.eap_ig_circuit(model, images, labels, head, reference, points=model.analysis_points()[-2:], node_fraction=0)


def test_the_method_enters_keys_only_when_it_is_not_the_papers():
    assert "circuit_method" not in Preset().analysis_key()
    assert Preset(circuit_method="eap_ig").analysis_key()["circuit_method"] == "eap_ig"
    # stages without circuits (CKA, SAE, embeddings) keep their keys under either method
    assert Preset(circuit_method="eap_ig").analysis_key(circuits=False) == Preset().analysis_key(circuits=False)
    assert QuickstartOptions(circuit_method="eap_ig").validate().preset().circuit_method == "eap_ig"
    with pytest.raises(ConfigError, match="circuit_method = 'eapig'; choose one of paper_ig, eap_ig"):
        QuickstartOptions(circuit_method="eapig").validate()

