"""Node explanations: TextSpan's explained variance by hand, total effects vs the ablation code,
per-domain ablation effects by hand, direct effects vs total effects, planted class-direction
nodes (ResNet attention-pool head, ViT head) labelled with the planted class, node parsing errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmech.analysis import explain as X
from clipmech.analysis import patching as P
from clipmech.analysis.circuits import ablated_embedding, ablation_values
from clipmech.models import HookedCLIP

WORDS = ["dog", "cat", "boat", "tree", "house", "car", "fish", "violin"]


def _class_embeddings() -> torch.Tensor:
    """Unit class embeddings [8, 64] spread like a trained text tower's (an untrained tower maps
    every prompt to nearly the same direction, so no label could stand out)."""
    gen = torch.Generator().manual_seed(11)
    return F.normalize(torch.randn(len(WORDS), 64, generator=gen, dtype=torch.double), dim=-1)


def test_text_span_explained_variance_equals_hand_computation():
    # effects along e1 (variance 3) and e2 (variance 1), uncorrelated; words e1, (e2+e3)/sqrt2, (e1+e2)/sqrt2.
    # Step 1: energies 3, 1/2, 2 of 4 -> e1 explains 3/4. Step 2: e1 projected out; the third word becomes
    # e2 (energy 1) and beats (e2+e3)/sqrt2 (1/2) -> 1/4. Step 3: nothing left -> 0.
    E = torch.tensor([[3 ** .5, 1, 0], [-3 ** .5, 1, 0], [3 ** .5, -1, 0], [-3 ** .5, -1, 0]], dtype=torch.double)
    E = E + 7.0  # a constant offset, which centring removes
    r = 2 ** -.5
    words = torch.tensor([[1.0, 0, 0], [0, r, r], [r, r, 0]], dtype=torch.double)
    picks = X.text_span(E, words, k=3, center=True)
    assert [j for j, _ in picks] == [0, 2, 1]
    assert [f for _, f in picks] == pytest.approx([0.75, 0.25, 0.0], abs=1e-12)
    # uncentred, the constant offset (7, 7, 7) dominates: the word closest to it wins first
    assert X.text_span(E, words, k=1, center=False)[0][0] == 2
    assert X.text_span(torch.zeros(3, 3), words) == []  # no energy: no labels
    assert X.principal_ceiling(E, 1, center=True) == pytest.approx(0.75)


def test_label_effects_reports_chance_ceiling_and_errors():
    gen = torch.Generator().manual_seed(0)
    words = torch.randn(5, 16, generator=gen, dtype=torch.double)
    effects = 2.0 * F.normalize(words[3], dim=0) * torch.rand(10, 1, generator=gen, dtype=torch.double)
    res = X.label_effects(effects, words, list("abcde"), k=2)
    assert res["labels"][0]["word"] == "d" and res["labels"][0]["fraction"] == pytest.approx(1.0)
    assert res["chance"] == pytest.approx(2 / 16) and res["ceiling"] == pytest.approx(1.0)
    assert res["explained"] <= res["ceiling"] + 1e-6 and res["labels"][0]["logit_effect"] > 0
    with pytest.raises(ValueError, match="2 words but 5 word embeddings"):
        X.label_effects(effects, words, ["a", "b"])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        X.label_effects(effects, words[:0], [])


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return HookedCLIP.from_config("tiny-rn").double()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.double)


def test_total_effects_match_the_ablation_code_and_domain_effects_by_hand(rn, batch):
    point = "visual.layer2.0.hook_out"
    fill = ablation_values(rn, batch, [point])[point]
    nodes = [3, 0, 17]
    effects = X.total_effects(rn, batch, point, nodes, fill, batch_nodes=2)
    assert effects.shape == (3, 4, 64)
    clean = F.normalize(rn.encode_image(batch), dim=-1).detach()
    for n, e in zip(nodes, effects):
        keep = torch.ones(len(fill.flatten(0, -2)[0]), dtype=torch.bool)
        keep[n] = False
        ablated = F.normalize(ablated_embedding(rn, batch, {point: keep}, fill={point: fill}), dim=-1)
        torch.testing.assert_close(e, clean - ablated)
    head = F.normalize(torch.randn(3, 64, dtype=torch.double), dim=-1)
    labels = torch.tensor([0, 1, 2, 1])
    domains = np.array([0, 0, 1, 1])
    act = X.node_activations(rn, batch, point, [17])[:, 0]
    summary = X.domain_summary(effects[2], act, labels, domains, head, ["a", "b", "c"])
    keep = torch.ones(len(act) * 0 + fill.shape[-1], dtype=torch.bool)
    keep[17] = False
    logits = P.cosine_logits(ablated_embedding(rn, batch, {point: keep}, fill={point: fill}), head)
    change = logits[torch.arange(4), labels] - P.cosine_logits(clean, head)[torch.arange(4), labels]
    assert summary["a"]["ablation_effect"] == pytest.approx(float(change[:2].mean()))
    assert summary["b"]["mean_activation"] == pytest.approx(float(act[2:].mean())) and "c" not in summary


def _plant_attnpool_head(model, direction, head_index):
    """Make attention-pool head `head_index` write (z . w) * direction into the embedding, about half
    the embedding's norm (a head that dominates the norm changes only its length, which the
    normalised embedding does not see: measured, the label is then noise)."""
    cp = model.visual.attnpool.c_proj
    dh = cp.in_features // model.visual.attnpool.num_heads
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = torch.randn(dh, generator=gen, dtype=cp.weight.dtype)
        cp.weight[:, head_index * dh:(head_index + 1) * dh] = direction[:, None] * w[None]


def test_planted_class_direction_head_is_labelled_with_its_class(batch):
    torch.manual_seed(0)
    model = HookedCLIP.from_config("tiny-rn").double()
    word_emb = _class_embeddings()
    planted, h = WORDS.index("boat"), 5
    _plant_attnpool_head(model, word_emb[planted], h)
    point = "visual.attnpool.hook_z"
    fill = ablation_values(model, batch, [point])[point]
    direct = X.direct_effects(model, batch, point, [h], fill)[0]
    total = X.total_effects(model, batch, point, [h], fill)[0]
    assert F.cosine_similarity(direct.flatten(), total.flatten(), dim=0) > 0.99  # first order of the same change
    for method in ("direct", "total"):
        res = X.explain_node(model, batch, torch.zeros(4, dtype=torch.long), np.zeros(4, int), ["d"], word_emb,
                             point, h, fill, word_emb, WORDS, method=method)
        assert res["method"] == method and res["labels"][0]["word"] == "boat"
        assert res["labels"][0]["fraction"] > 3 * res["chance"]
    # the label follows the plant: the same head planted with another class
    model = HookedCLIP.from_config("tiny-rn").double()
    _plant_attnpool_head(model, word_emb[WORDS.index("fish")], h)
    res = X.explain_node(model, batch, torch.zeros(4, dtype=torch.long), np.zeros(4, int), ["d"], word_emb, point, h,
                         ablation_values(model, batch, [point])[point], word_emb, WORDS, method="direct")
    assert res["labels"][0]["word"] == "fish"


def test_planted_vit_head_is_labelled_by_textspan(batch):
    torch.manual_seed(0)
    model = HookedCLIP.from_config("tiny-vit").double()
    word_emb = _class_embeddings()
    planted, h = WORDS.index("violin"), 1
    vit = model.visual
    blk = vit.transformer.resblocks[-1]
    # a residual direction u with zero mean whose LayerNorm-scaled projection is (about) the word
    A = torch.cat([(vit.proj.T * vit.ln_post.weight), torch.ones(1, vit.proj.shape[0], dtype=torch.double)])
    target = torch.cat([word_emb[planted], torch.zeros(1, dtype=torch.double)])
    u = torch.linalg.lstsq(A, target[:, None]).solution[:, 0]
    dh = blk.attn.out_proj.in_features // blk.attn.num_heads
    with torch.no_grad():
        w = torch.randn(dh, generator=torch.Generator().manual_seed(2), dtype=torch.double)
        blk.attn.out_proj.weight[:, h * dh:(h + 1) * dh] = 10 * u[:, None] * w[None]
    point = "visual.blocks.1.attn.hook_z"
    assert X.choose_method(model, point) == "textspan"
    fill = ablation_values(model, batch, [point])[point]
    res = X.explain_node(model, batch, torch.zeros(4, dtype=torch.long), np.zeros(4, int), ["d"], word_emb, point, h,
                         fill, word_emb, WORDS)
    assert res["method"] == "textspan" and res["labels"][0]["word"] == "violin"


def test_parse_node_and_method_errors(rn):
    assert X.parse_node(rn, "visual.layer1.0.hook_out/63") == ("visual.layer1.0.hook_out", 63)  # last node
    with pytest.raises(ValueError, match=r"does not exist: visual.layer1.0.hook_out has 64 nodes \(0..63\)"):
        X.parse_node(rn, "visual.layer1.0.hook_out/64")
    with pytest.raises(ValueError, match="must be written POINT/INDEX"):
        X.parse_node(rn, "visual.layer1.0.hook_out")
    with pytest.raises(KeyError, match="visual.layer1.0.hook_out"):
        X.parse_node(rn, "visual.layer1.0.hook_outt/3")
    assert X.parse_node(rn, "visual.attnpool.hook_z/15") == ("visual.attnpool.hook_z", 15)  # 16 heads
    assert X.choose_method(rn, "visual.layer3.0.hook_out") == "total"
    assert X.choose_method(rn, "visual.attnpool.hook_z") == "direct"
    with pytest.raises(ValueError, match="has none"):
        X.choose_method(rn, "visual.layer3.0.hook_out", "direct")
    with pytest.raises(ValueError, match="no direct path"):
        X.direct_effects(rn, torch.zeros(1, 3, 64, 64, dtype=torch.double), "visual.layer3.0.hook_out", [0])


def test_top_examples_per_group():
    values = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    groups = np.array([0, 0, 0, 1, 1, 1])
    assert X.top_examples(values, groups, 2) == {0: [1, 2], 1: [4, 3]}
    assert X.top_examples(values, groups, 5) == {0: [1, 2, 0], 1: [4, 3, 5]}
