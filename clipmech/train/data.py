"""Training input pipeline: a mixture's images and captions, seeded augmentation, resumable sharded order.

Own code (why): torchvision's RandomResizedCrop draws from the global RNG, and torch's
DistributedSampler cannot start mid-epoch, so neither gives a bit-exact resume. Here every sample's
crop is drawn from its own generator seeded by (run seed, epoch, position), and the batch order is a
pure function of (seed, epoch, step): a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from clipmech.data.dataset import UnreadableImageError
from clipmech.data.preprocess import image_tensor, normalize

CROP_SCALE = (0.9, 1.0)  # docs/methods.md#training
CROP_RATIO = (3 / 4, 4 / 3)


def crop_params(height: int, width: int, g: torch.Generator, scale=CROP_SCALE, ratio=CROP_RATIO
                ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box drawn from generator `g` (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    # fallback as torchvision: the whole image, clipped to the allowed aspect ratios, centred
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


class MixtureView(Dataset):
    """Items of a mixture for training. Key = (position in mixture, crop seed or -1 for no crop).

    Positions 0..len(base_lines)+len(extra_lines)-1 are the base TSV and extra pairs (image files),
    then the dataset samples,
    the order of the mixture's TSV. Yields (image float32 [3, S, S] normalised, tokens int64
    [context_length], position, path of an unreadable image that was skipped or "").
    """

    def __init__(self, mixture, image_size: int, context_length: int, augment: bool = True):
        self.dataset = mixture.dataset
        self.indices = np.asarray(mixture.indices, dtype=np.int64)
        self.captions = list(mixture.captions)
        if len(self.captions) != len(self.indices):
            raise ValueError(f"mixture has {len(self.indices)} images but {len(self.captions)} captions")
        # base TSV lines, then extra lines (ImageNet-Sketch), as in the mixture's TSV
        lines = [*(getattr(mixture, "base_lines", None) or []), *(getattr(mixture, "extra_lines", None) or [])]
        self.base = [line.split("\t", 1) for line in lines]
        self.image_size = image_size
        self.context_length = context_length
        self.augment = augment
        # Tokens per position, filled on first use: captions are fixed per sample, and BPE-tokenizing
        # them again every epoch was ~10% of quickstart training time (benchmarks/quickstart_profile.py).
        self._tokens: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.base) + len(self.indices)

    def _load(self, pos: int) -> tuple[torch.Tensor, str]:
        """(uint8 image, caption) of `pos`; UnreadableImageError when its file does not decode."""
        if pos < len(self.base):
            path, caption = self.base[pos]
            try:
                with Image.open(path) as im:
                    return TF.pil_to_tensor(im.convert("RGB")), caption
            except (OSError, SyntaxError, ValueError) as err:
                raise UnreadableImageError(path, err) from err
        return image_tensor(self.dataset, int(self.indices[pos - len(self.base)])), self.captions[pos - len(self.base)]

    def __getitem__(self, key: tuple[int, int]):
        """(image, tokens, position, unreadable path or ""). An unreadable image is skipped: the
        next readable position stands in (same batch size on every rank, same on resume) and its
        path is returned so the trainer can count it."""
        pos, seed = key
        bad = ""
        for probe in range(len(self)):
            try:
                img, caption = self._load((pos + probe) % len(self))
                break
            except UnreadableImageError as err:
                bad = bad or err.path
        else:
            raise UnreadableImageError(bad, "no image of the mixture can be read")
        size = [self.image_size, self.image_size]
        if self.augment and seed >= 0:
            top, left, h, w = crop_params(img.shape[-2], img.shape[-1], torch.Generator().manual_seed(seed))
            img = TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
        else:
            img = TF.center_crop(TF.resize(img, size[0], InterpolationMode.BICUBIC, antialias=True), size)
        tokens = self._tokens.get(pos)
        if tokens is None:
            tokens = self._tokens[pos] = open_clip.tokenize([caption], context_length=self.context_length)[0]
        return normalize(img), tokens.clone(), pos, bad


class ResumableBatchSampler(Sampler):
    """Sharded batches in a per-epoch random order that can start at any optimizer step.

    One optimizer step consumes a global batch of `batch_size * world_size * accum_freq` positions;
    micro-batch `a` of rank `r` is its slice `[(a*W + r)*B : (a*W + r + 1)*B]`, so ranks joined in
    rank order form the same batch a single process with batch `B*W` would see. The last incomplete
    global batch is dropped. Yields lists of (position, crop seed).
    """

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0, accum_freq: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.world_size, self.rank, self.accum_freq = world_size, rank, accum_freq
        self.global_batch = batch_size * world_size * accum_freq
        if self.global_batch > n:
            raise ValueError(f"a global batch of {self.global_batch} (batch_size {batch_size} x {world_size} "
                             f"processes x accum_freq {accum_freq}) exceeds the {n} training samples; "
                             "lower --batch-size")
        self.steps_per_epoch = n // self.global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation [n], crop seeds [n]) for `epoch`: a pure function of (seed, epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g), torch.randint(0, 2**62, (self.n,), generator=g)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_freq

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, seeds = self.order(self.epoch)
        B, W = self.batch_size, self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch
            for a in range(self.accum_freq):
                lo = base + (a * W + self.rank) * B
                pos = perm[lo:lo + B].tolist()
                yield [(p, int(seeds[p])) for p in pos]
