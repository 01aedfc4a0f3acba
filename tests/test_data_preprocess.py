"""The shared preprocessing: normalisation and its inverse, the black-image baseline, and one home
for the evaluation transform that training, evaluation and analysis all use."""
import torch

from clipmech.data import preprocess as P
from clipmech.eval import zeroshot
from clipmech.train import data as train_data


def test_normalize_and_denormalize_are_inverse_and_black_is_pixel_zero():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    z = P.normalize(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    torch.testing.assert_close(P.denormalize(z), x.float() / 255, rtol=0, atol=1e-6)
    torch.testing.assert_close(P.black_image().expand(1, 3, 2, 2), P.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)))
    assert float(P.denormalize(torch.full((3, 1, 1), 1e3)).max()) == 1.0  # clipped for display


def test_one_home_for_the_preprocessing():
    """Evaluation's cache key and transform and the training pipeline's normalisation are the same objects."""
    assert zeroshot.eval_images is P.eval_images and zeroshot.eval_transform_description is P.eval_transform_description
    assert train_data.normalize is P.normalize and train_data.image_tensor is P.image_tensor
    assert P.eval_transform_description(32) == "resize32-bicubic-centercrop32-openai-mean-std"  # cache keys unchanged
