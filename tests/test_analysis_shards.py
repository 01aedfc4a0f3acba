"""Streamed activation shards: parity with in-memory extraction, content-hashed reuse, streamed
centroids giving the same CKA as the full activations."""
import numpy as np
import pytest
import torch

from clipmech.analysis.activations import EvalPreprocess, ShardSet, cell_means, write_shards
from clipmech.analysis.cka import domain_cka
from clipmech.data.dataset import DomainDataset
from clipmech.models import HookedCLIP

PTS = ["visual.hook_act1", "visual.layer2.0.hook_out", "hook_image_embed_normalized"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = HookedCLIP.from_config("tiny-rn").eval()
    rng = np.random.default_rng(0)
    n = 40
    ds = DomainDataset("toy", ["real", "sketch", "paint"], ["cat", "dog", "cow", "pig", "owl"],
                       domain_idx=np.arange(n) % 3, class_idx=(np.arange(n) // 3) % 5, split=np.array(["test"] * n),
                       images=rng.integers(0, 255, size=(n, 20, 20, 3), dtype=np.uint8))
    return model, ds


def test_eval_preprocess_matches_eval_images(tiny):
    from clipmech.data.preprocess import eval_images
    _, ds = tiny
    got = torch.stack([EvalPreprocess(32)(ds.load_image(i)) for i in range(3)])
    assert torch.equal(got, eval_images(ds, [0, 1, 2], 32))


def test_shards_match_direct_pass_and_are_reused(tiny, tmp_path, monkeypatch):
    model, ds = tiny
    idx = np.arange(len(ds))[::-1].copy()  # any order: rows come back in the order asked
    shards = write_shards(model, ds, idx, PTS, tmp_path, "m0", batch_size=7, shard_rows=16)
    images = torch.stack([EvalPreprocess(model.image_size)(ds.load_image(int(i))) for i in idx])
    with torch.no_grad():
        _, cache = model.run_with_cache(image=images, names_filter=PTS)
    got = {p: [] for p in PTS}
    seen = []
    for rows, xs in shards.iter_batches(PTS, batch_size=5):
        seen.append(rows)
        for p in PTS:
            got[p].append(xs[p])
    assert np.array_equal(np.concatenate(seen), idx)
    assert torch.allclose(torch.cat(got["visual.hook_act1"]), cache["visual.hook_act1"].mean((2, 3)), atol=1e-5)
    assert torch.allclose(torch.cat(got["hook_image_embed_normalized"]), cache["hook_image_embed_normalized"], atol=1e-5)
    assert len(shards.shards(PTS[0]).shards) == 3  # 40 rows in shards of 16: 16 + 16 + 8
    # same content -> same folder, read back without running the model
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    again = write_shards(model, ds, idx, PTS, tmp_path, "m0", batch_size=3, shard_rows=8)
    assert again.folder == shards.folder
    # other weights (model key) or other rows -> another folder
    with pytest.raises(AssertionError, match="ran"):
        write_shards(model, ds, idx, PTS, tmp_path, "m1")
    with pytest.raises(AssertionError, match="ran"):
        write_shards(model, ds, idx[:5], PTS, tmp_path, "m0")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_unfinished_shards_are_not_served(tiny, tmp_path):
    model, ds = tiny
    shards = write_shards(model, ds, np.arange(6), PTS[:1], tmp_path, "m0")
    (shards.folder / "done").unlink()
    with pytest.raises(FileNotFoundError, match="extract them first"):
        ShardSet(shards.folder)
    with pytest.raises(KeyError, match="precision"):
        write_shards(model, ds, np.arange(6), PTS[:1], tmp_path, "m0", precision="fp8")


def test_streamed_centroids_give_the_same_cka(tiny, tmp_path):
    model, ds = tiny
    idx = np.arange(len(ds))
    shards = write_shards(model, ds, idx, PTS, tmp_path, "m0", batch_size=6, shard_rows=10)
    full = {p: torch.cat([xs[p] for _, xs in shards.iter_batches(PTS)]) for p in PTS}
    subsets = {"all": list(range(5))}
    ref = domain_cka(full, ds.class_idx, ds.domain_idx, ds.domains, subsets, kernels=("linear",), n_boot=20, n_perm=0)
    means, cells = cell_means(shards, PTS, ds.class_idx, ds.domain_idx, 3, 5, batch_size=4)
    assert cells.shape == (15, 2)
    got = domain_cka(means, cells[:, 1], cells[:, 0], ds.domains, subsets, kernels=("linear",), n_boot=20, n_perm=0)
    for pair, r in ref["results"]["all"]["linear"].items():
        assert np.allclose(got["results"]["all"]["linear"][pair]["cka"], r["cka"], atol=1e-10)
        assert np.allclose(got["results"]["all"]["linear"][pair]["ci_low"], r["ci_low"], atol=1e-10)


def test_bf16_extraction_is_close_and_kept_apart(tiny, tmp_path):
    model, ds = tiny
    fp32 = write_shards(model, ds, np.arange(8), PTS[-1:], tmp_path, "m0")
    bf16 = write_shards(model, ds, np.arange(8), PTS[-1:], tmp_path, "m0", precision="bf16")
    assert bf16.folder != fp32.folder
    a = next(fp32.iter_batches(PTS[-1:]))[1][PTS[-1]]
    b = next(bf16.iter_batches(PTS[-1:]))[1][PTS[-1]]
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.05)  # normalised embeddings: bf16 keeps ~3 significant digits
