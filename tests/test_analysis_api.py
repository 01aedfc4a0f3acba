"""One attribution signature across the engine: a `metric` (default the true-class logit), one
ablation vocabulary, one default Riemann rule; the old spellings keep working with a
DeprecationWarning and give the same numbers."""
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipmech.analysis import ablation as AB
from clipmech.analysis import attribution as A
from clipmech.analysis import circuit as CI
from clipmech.analysis import patching as P
from clipmech.analysis.metrics import logit_difference, true_class_logit
from clipmech.models import HookedCLIP

POINT = "visual.layer3.0.hook_out"


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return HookedCLIP.from_config("tiny-rn").double()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.double)
    other = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.double)
    head = F.normalize(torch.randn(4, 64, generator=gen, dtype=torch.double), dim=-1)
    return images, other, head, torch.tensor([0, 1, 2])


def test_one_default_rule_and_vocabulary_in_every_signature():
    for fn in (A.integrated_gradients, A.ig_node_scores, A.ig_edge_scores, CI.discover_circuit):
        assert inspect.signature(fn).parameters["rule"].default == A.RIEMANN_RULE == "right", fn.__name__
    for fn in (A.integrated_gradients, A.ig_node_scores, CI.discover_circuit, AB.faithfulness,
               AB.faithfulness_curve):
        assert "metric" in inspect.signature(fn).parameters, fn.__name__
    for fn in (A.replacement, A.integrated_gradients, P.activation_patch, AB.ablation_values, AB.ablated_embedding,
               AB.faithfulness):
        assert "ablation" in inspect.signature(fn).parameters, fn.__name__


def test_node_scores_are_the_zero_ablation_ig_per_image(rn, batch):
    # score[c] = |mean_b sum_pos g (0 - a)| and IG[c] = sum_b sum_pos (a - 0) g: the same path, any metric.
    images, _, head, labels = batch
    n = len(images)
    for metric in (true_class_logit(head, labels, reduce="sum"), logit_difference(head, labels, 3, reduce="sum")):
        ig = A.integrated_gradients(rn, images, metric, POINT, ablation="zero", steps=3)
        scores = A.ig_node_scores(rn, images, None, None, POINT, steps=3, metric=metric)
        torch.testing.assert_close(scores, ig.abs() / n, rtol=1e-9, atol=1e-14)
    default = A.ig_node_scores(rn, images, labels, head, POINT, steps=3)
    explicit = A.ig_node_scores(rn, images, labels, head, POINT, steps=3, metric=true_class_logit(head, labels, "sum"))
    torch.testing.assert_close(default, explicit, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="labels and a zero-shot head"):
        A.ig_node_scores(rn, images, None, None, POINT, steps=2)


def test_discover_circuit_takes_a_metric(rn, batch):
    images, _, head, labels = batch
    pts = [POINT, "visual.layer4.0.hook_out"]
    other = logit_difference(head, labels, 3, reduce="sum")
    circuit = CI.discover_circuit(rn, images, None, None, points=pts, steps=2, edges=False, metric=other)
    expected = A.ig_node_scores(rn, images, None, None, POINT, steps=2, metric=other)
    torch.testing.assert_close(circuit.node_scores[POINT], expected)
    assert circuit.meta["metric"].startswith("logit_difference")


def test_old_names_warn_and_give_the_same_numbers(rn, batch):
    images, other, head, labels = batch
    metric = true_class_logit(head, labels)
    new = P.activation_patch(rn, images, metric, POINT, ablation="resample", source=other, units=[0, 3])
    with pytest.warns(DeprecationWarning, match="ablation="):
        old = P.activation_patch(rn, images, metric, POINT, mode="resample", source=other, units=[0, 3])
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    new = A.integrated_gradients(rn, images, metric, POINT, ablation="resample", source=other, steps=2)
    with pytest.warns(DeprecationWarning) as record:
        old = A.integrated_gradients(rn, images, metric, POINT, baseline="corrupt", corrupt=other, steps=2)
    assert {str(w.message).split(" is ")[0] for w in record} == {
        "integrated_gradients(baseline=...)", "integrated_gradients(corrupt=...)", "the ablation 'corrupt'"}
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="replacement"):
        old = A.replacement(rn, images, POINT, mode="mean", reference=other)
    torch.testing.assert_close(old, A.replacement(rn, images, POINT, "mean", reference=other), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ablation must be one of \('zero', 'mean', 'resample'\)"):
        A.replacement(rn, images, POINT, "corrupt")


def test_resample_ablation_of_circuit_nodes(rn, batch):
    images, other, head, labels = batch
    pts = [POINT]
    fill = AB.ablation_values(rn, other, pts, "resample")
    torch.testing.assert_close(fill[POINT], AB.resample_values(rn, other, pts)[POINT], rtol=0, atol=0)
    keep = {POINT: torch.zeros(256, dtype=torch.bool)}
    # Every node resampled: the run continues from the donors' activations.
    emb = AB.ablated_embedding(rn, images, keep, ablation="resample", reference=other)
    donor = rn.forward_from(POINT, A.cache_points(rn, other, pts)[POINT])
    torch.testing.assert_close(emb, donor)
    with pytest.raises(ValueError, match="needs the donor images"):
        AB.ablated_embedding(rn, images, keep, ablation="resample")


def test_library_code_never_picks_a_matplotlib_backend():
    # A notebook owns its backend: only the command-line modules may call matplotlib.use or pyplot.
    root = Path(__file__).resolve().parents[1] / "clipmech"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if not p.name.startswith("cli")
                 and ("matplotlib.use(" in p.read_text() or "matplotlib.pyplot" in p.read_text())]
    assert offenders == []
