"""A tiny learnable in-memory DomainDataset for trainer/eval tests, and tests of the input pipeline.

Other test_train_* / test_eval_* modules (and the subprocess runs they launch) import
`synthetic_dataset` / `synthetic_mixture` from here.
"""
from types import SimpleNamespace

import numpy as np
import torch

from clipmech.data.dataset import DomainDataset
from clipmech.data.preprocess import OPENAI_MEAN, OPENAI_STD
from clipmech.train.data import MixtureView, ResumableBatchSampler, crop_params

CLASSES = ["red square", "green square", "blue square", "yellow bar", "cyan bar", "magenta dot"]
DOMAINS = ["real", "sketch", "clipart"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20), (20, 220, 220), (220, 20, 220)]


def synthetic_dataset(per_bucket: int = 4, size: int = 32, seed: int = 0) -> DomainDataset:
    """len(DOMAINS) x len(CLASSES) x per_bucket images; class = colour + shape, domain = background.

    The last image of every (domain, class) bucket is the test split.
    """
    rng = np.random.default_rng(seed)
    images, dom, cls, split = [], [], [], []
    for d in range(len(DOMAINS)):
        for c, colour in enumerate(COLOURS):
            for j in range(per_bucket):
                if d == 0:
                    img = rng.integers(60, 200, (size, size, 3))
                elif d == 1:
                    img = np.full((size, size, 3), 255) - rng.integers(0, 30, (size, size, 1))
                else:
                    img = np.full((size, size, 3), (200, 200, 120))
                lo, hi = size // 4 + int(rng.integers(-3, 4)), 3 * size // 4 + int(rng.integers(-3, 4))
                if c < 3:
                    img[lo:hi, lo:hi] = colour
                elif c < 5:
                    img[lo:hi, size // 2 - 3:size // 2 + 3] = colour
                else:
                    img[size // 2 - 5:size // 2 + 5, size // 2 - 5:size // 2 + 5] = colour
                images.append(img.astype(np.uint8))
                dom.append(d), cls.append(c), split.append("test" if j == per_bucket - 1 else "train")
    return DomainDataset("synthetic", DOMAINS, CLASSES, np.array(dom), np.array(cls), np.array(split),
                         images=np.stack(images), default_test_domain="sketch",
                         default_test_classes=["blue square", "magenta dot"])


def synthetic_mixture(dataset: DomainDataset | None = None) -> SimpleNamespace:
    """All train samples of `dataset` with captions '<domain-word> of a <class>' (duck-typed Mixture)."""
    ds = dataset if dataset is not None else synthetic_dataset()
    idx = ds.indices(split="train")
    words = {"real": "a photo", "sketch": "a sketch", "clipart": "a clipart"}
    captions = [f"{words[ds.domains[ds.domain_idx[i]]]} of a {ds.classes[ds.class_idx[i]]}" for i in idx]
    return SimpleNamespace(dataset=ds, indices=idx, captions=captions, manifest={}, id="synthetic-all")


def test_crop_params_are_seeded_and_inside_the_image():
    a = [crop_params(32, 40, torch.Generator().manual_seed(s)) for s in range(50)]
    b = [crop_params(32, 40, torch.Generator().manual_seed(s)) for s in range(50)]
    assert a == b
    for top, left, h, w in a:
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 40
        assert 0.9 * 32 * 40 * 0.97 <= h * w <= 32 * 40  # scale (0.9, 1.0), up to rounding
    assert len(set(a)) > 10


def test_mixture_view_normalises_and_tokenizes():
    mix = synthetic_mixture()
    view = MixtureView(mix, image_size=48, context_length=16, augment=False)
    img, tokens, pos, bad = view[(3, -1)]
    assert img.shape == (3, 48, 48) and tokens.shape == (16,) and pos == 3 and bad == ""
    raw = torch.from_numpy(mix.dataset.images[mix.indices[3]]).float().div(255).mean(dim=(0, 1))
    std = torch.tensor(OPENAI_STD)
    mean_back = img.mean(dim=(1, 2)) * std + torch.tensor(OPENAI_MEAN)
    assert torch.allclose(mean_back, raw, atol=0.02)  # upsampling keeps the mean colour
    aug1, _, _, _ = view.__class__(mix, 48, 16, augment=True)[(3, 7)]
    aug2, _, _, _ = view.__class__(mix, 48, 16, augment=True)[(3, 7)]
    assert torch.equal(aug1, aug2)


def test_sampler_shards_form_the_single_process_batch_and_resume_mid_epoch():
    n, B, W = 50, 4, 2
    single = list(ResumableBatchSampler(n, B * W, seed=3))
    ranks = [list(ResumableBatchSampler(n, B, seed=3, world_size=W, rank=r)) for r in range(W)]
    assert len(single) == n // (B * W)
    for step, batch in enumerate(single):
        assert batch == ranks[0][step] + ranks[1][step]
    resumed = ResumableBatchSampler(n, B * W, seed=3)
    resumed.set_epoch(0, start_step=2)
    assert list(resumed) == single[2:]
    other_epoch = ResumableBatchSampler(n, B * W, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != single


def test_sampler_rejects_a_batch_larger_than_the_data():
    import pytest
    with pytest.raises(ValueError, match="exceeds the 10 training samples"):
        ResumableBatchSampler(10, 8, seed=0, world_size=1, accum_freq=2)


def test_mixture_view_puts_base_tsv_pairs_first(tmp_path):
    from PIL import Image
    mix = synthetic_mixture()
    paths = []
    for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"base{k}.png")
        Image.new("RGB", (20, 24), colour).save(paths[-1])
    mix.base_lines = [f"{p}\tbase caption {k}" for k, p in enumerate(paths)]
    view = MixtureView(mix, image_size=32, context_length=16, augment=False)
    assert len(view) == 2 + len(mix.indices)
    img, tokens, _, _ = view[(1, -1)]
    back = img * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    assert torch.allclose(back.mean(dim=(1, 2)), torch.tensor([0.0, 0.0, 1.0]), atol=0.01)
    import open_clip
    assert torch.equal(tokens, open_clip.tokenize(["base caption 1"], context_length=16)[0])
    _, tokens2, _, _ = view[(2, -1)]  # the first dataset sample follows the base pairs
    assert torch.equal(tokens2, open_clip.tokenize([mix.captions[0]], context_length=16)[0])
