"""Image preprocessing shared by training, evaluation and analysis: the OpenAI normalisation (and its
inverse), reading one dataset image as a uint8 tensor, and the evaluation transform (resize the short
side, centre crop, normalise). Training's seeded augmentation stays in `clipmech.train.data`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import open_clip
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from clipmech.data.dataset import UnreadableImageError

OPENAI_MEAN = open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = open_clip.OPENAI_DATASET_STD


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised with OpenAI mean/std."""
    mean, std = _mean_std()
    return (images_uint8.float().div_(255) - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] in [0, 1]: the OpenAI normalisation undone and clipped (for display)."""
    mean, std = _mean_std()
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


def black_image() -> torch.Tensor:
    """[1, 3, 1, 1]: pixel value 0 after the OpenAI normalisation (an input-IG baseline)."""
    return normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))


def image_tensor(dataset, index: int) -> torch.Tensor:
    """uint8 [3, H, W] of dataset image `index` (in-memory array or file)."""
    if getattr(dataset, "images", None) is not None:
        return torch.from_numpy(np.array(dataset.images[index])).permute(2, 0, 1)  # copy: arrays may be read-only
    return TF.pil_to_tensor(dataset.load_image(index).convert("RGB"))


def eval_transform_description(image_size: int) -> str:
    """Names the evaluation preprocessing; part of every feature-cache key."""
    return f"resize{image_size}-bicubic-centercrop{image_size}-openai-mean-std"


def eval_images(dataset, indices: Sequence[int], image_size: int, skip_unreadable: bool = False) -> torch.Tensor:
    """float32 [len(indices), 3, S, S]: resize (short side) + centre crop + OpenAI normalisation.

    An unreadable image raises UnreadableImageError, or with `skip_unreadable` becomes an all-NaN
    image that `clipmech.eval.zeroshot.encode_dataset` turns into an all-NaN feature row."""
    out = []
    for i in indices:
        try:
            img = TF.resize(image_tensor(dataset, int(i)), image_size, InterpolationMode.BICUBIC, antialias=True)
        except UnreadableImageError:
            if not skip_unreadable:
                raise
            out.append(torch.full((3, image_size, image_size), float("nan")))
            continue
        out.append(normalize(TF.center_crop(img, [image_size, image_size])))
    return torch.stack(out)
