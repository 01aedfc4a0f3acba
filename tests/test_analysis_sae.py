"""SAE training from shards, its metrics, feature sharing (Algorithms 1-2) and concept naming."""
import numpy as np
import pytest
import torch

from clipmech.analysis.sae import ActivationShards, SAEConfig, ShardWriter, SparseAutoencoder, evaluate_sae, train_sae
from clipmech.analysis.sharing import (
    dataset_vocabulary, feature_sharing, name_latents, overlap_at_k, top_latent_histograms)


def _sparse_data(n=3000, d=16, n_true=24, active=3, seed=0):
    """x = sum of `active` random unit dictionary atoms with positive weights (a known sparse code)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:active] for _ in range(n)])
    w = torch.rand(n, active, generator=g) + 0.5
    return torch.einsum("na,nad->nd", w, atoms[idx]) + 2.0  # offset: the tied bias must absorb it


def test_shards_roundtrip_stream_and_train(tmp_path):
    X = _sparse_data(n=1000, d=12, n_true=16)
    w = ShardWriter(tmp_path / "acts", shard_size=400)
    for part in X.split(150):
        w.add(part)
    shards = w.close()
    assert len(shards) == 1000 and shards.dim == 12 and len(shards.shards) == 3
    streamed = torch.cat(list(shards.iter_batches(512, shuffle=True, seed=1)))
    assert streamed.shape == X.shape
    assert torch.equal(streamed.sort(0).values, X.sort(0).values)  # every row exactly once
    assert torch.equal(torch.cat(list(shards.iter_batches(512, shuffle=False))), X)
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "acts")

    sae, hist = train_sae(shards, n_latents=32, lr=1e-2, epochs=40, batch_size=100, seed=0)  # paper_l1(12)
    assert hist[-1]["recon"] < 0.5 * hist[0]["recon"]
    m = evaluate_sae(sae, shards)
    assert m["n"] == 1000 and m["fvu"] < 0.15
    weak, _ = train_sae(shards, n_latents=32, l1_coef=1e-5, lr=1e-2, epochs=40, batch_size=100, seed=0)
    assert 0 < m["l0"] < evaluate_sae(weak, shards)["l0"] - 3  # a stronger L1 penalty gives sparser codes
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    # metrics computed directly agree with the streamed ones
    with torch.no_grad():
        x_hat, z = sae(X)
    fvu = float(((X - x_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert m["dead_latents"] == int(((z > 0).sum(0) == 0).sum())
    sae.save(tmp_path / "sae.pt")
    again = SparseAutoencoder.load(tmp_path / "sae.pt")
    assert torch.equal(again.encode(X), sae.encode(X))


def test_topk_variant_has_exact_sparsity():
    X = _sparse_data(n=1000, d=12, n_true=16)
    sae, _ = train_sae(X, n_latents=32, k=4, lr=1e-2, epochs=20, batch_size=100, seed=0)
    z = sae.encode(X)
    assert int((z > 0).sum(1).max()) <= 4
    assert evaluate_sae(sae, X)["fvu"] < 0.2
    with pytest.raises(ValueError, match="0 < k <= n_latents"):
        SparseAutoencoder(SAEConfig(4, 8, k=9))


def test_dead_latents_and_constant_data_errors():
    sae = SparseAutoencoder(SAEConfig(4, 6))
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[0] = 100.0
    m = evaluate_sae(sae, torch.randn(50, 4))
    assert m["dead_latents"] == 5 and m["dead_fraction"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="zero variance"):
        evaluate_sae(sae, torch.ones(10, 4))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ActivationShards("/nonexistent/acts")


def test_histograms_follow_algorithm_1():
    codes = torch.tensor([[5., 4., 0., 1.], [0., 3., 2., 0.], [1., 0., 0., 9.]])
    H = top_latent_histograms(codes, np.array([0, 0, 1]), np.array([0, 0, 1]), classes=[0, 1], n_domains=2, top=2)
    assert H.shape == (2, 2, 4)
    assert H[0, 0].tolist() == [1, 2, 1, 0]   # top-2 of row0 = {0,1}; row1 = {1,2}
    assert H[1, 1].tolist() == [1, 0, 0, 1]
    assert H[0, 1].sum() == 0 and H[1, 0].sum() == 0
    # only positive codes count: a row with a single positive entry contributes one latent
    H1 = top_latent_histograms(torch.tensor([[0., 0., 7., 0.]]), np.array([0]), np.array([0]), [0], 1, top=3)
    assert H1[0, 0].tolist() == [0, 0, 1, 0]


def test_overlap_and_sharing_matrix_known_answers():
    Ha = torch.tensor([9, 8, 7, 6, 0, 0])
    Hb = torch.tensor([9, 0, 7, 0, 5, 4])
    assert overlap_at_k(Ha, Hb, 2) == 0.5           # {0,1} vs {0,2}
    assert overlap_at_k(Ha, Hb, 4) == 0.5           # {0,1,2,3} vs {0,2,4,5}
    assert overlap_at_k(Ha, Ha, 6) == pytest.approx(4 / 6)  # zero-count latents never count as shared
    H = torch.stack([torch.stack([Ha, Hb, Ha]), torch.stack([Ha, Ha, torch.zeros(6, dtype=torch.long)])])
    out = feature_sharing(H, ["a", "b", "c"], ks=(2, 4))
    M = out["matrix"]
    assert M[0][1] == pytest.approx((0.5 + 1.0) / 2)  # class0: 0.5 ; class1: Ha vs Ha = 1.0
    assert M[0][2] == pytest.approx(1.0) and out["n_classes"][0][2] == 1  # class1 absent from c
    assert out["per_class"][1][0][2] is None
    assert out["score"]["a"] == pytest.approx((M[0][1] + M[0][2]) / 2)
    assert M[1][1] == pytest.approx(1.0)


def test_name_latents_and_vocabulary():
    words = ["cat", "dog", "car"]
    emb = torch.eye(3, 5)
    dec = torch.tensor([[0., 2., 0., 0., 0.], [1., 0., 0.1, 0., 0.]])
    names = name_latents(dec, emb, words)
    assert [n["word"] for n in names] == ["dog", "cat"] and names[0]["cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="joint embedding"):
        name_latents(torch.ones(2, 4), emb, words)

    class DS:
        classes, domains, keywords = ["red apple", "cat"], ["real", "sketch"], {"red apple": ["apple", "fruit"], "cat": ["cat"]}
    assert dataset_vocabulary(DS) == ["red apple", "apple", "fruit", "cat", "real", "sketch"]


def test_step_budget_equals_epochs_at_whole_passes_and_stops_mid_pass():
    """`steps` = epochs x ceil(N / batch) trains exactly as `epochs` (same batches, same order); one
    step more opens a partial pass of exactly one batch; steps < 1 is refused."""
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))  # 50 / 16 -> 4 batches (16, 16, 16, 2)
    by_epochs, h_epochs = train_sae(x, n_latents=16, epochs=3, batch_size=16, seed=1)
    by_steps, h_steps = train_sae(x, n_latents=16, steps=12, batch_size=16, seed=1)
    for name, value in by_epochs.state_dict().items():
        assert torch.equal(value, by_steps.state_dict()[name]), name
    assert h_steps == h_epochs and len(h_steps) == 3
    _, h_more = train_sae(x, n_latents=16, steps=13, batch_size=16, seed=1)
    assert len(h_more) == 4 and h_more[:3] == h_epochs and h_more[3]["epoch"] == 3
    with pytest.raises(ValueError, match="SAE steps must be >= 1, got 0"):
        train_sae(x, n_latents=16, steps=0)
