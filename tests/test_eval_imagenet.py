"""ImageNet-1k zero-shot top-1 (paper.md §7) on a fake 1000-class val folder, fp32 and fp16."""
import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from clipmech.eval.imagenet import evaluate_run_imagenet, imagenet_scores, imagenet_top1, imagenet_val
from clipmech.data.preprocess import eval_images
from clipmech.models import HookedCLIP

IMAGES = {0: 2, 7: 1, 500: 2, 999: 1}


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for k in range(1000):
        folder = root / "val" / f"n{k + 1:08d}"
        folder.mkdir(parents=True)
        for j in range(IMAGES.get(k, 0)):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"ILSVRC_{k}_{j}.JPEG")
    return root


def test_top1_matches_a_per_image_recomputation(val_root):
    ds = imagenet_val(val_root)
    assert len(ds) == 6 and ds.class_idx.tolist() == [0, 0, 7, 500, 500, 999]
    model = HookedCLIP.from_config({**HookedCLIP.from_config("tiny-rn").cfg}).eval()
    scores = imagenet_scores(model, ds, templates=["a photo of a {}."])
    with torch.no_grad():
        head = model.zero_shot_head(list(IMAGENET_CLASSNAMES), ["a photo of a {}."])
        want = [int((model.encode_image(eval_images(ds, [i], model.image_size), normalize=True) @ head.T).argmax())
                for i in range(len(ds))]
    assert scores.shape == (6, 1000) and scores.argmax(1).tolist() == want
    res = imagenet_top1(scores, ds)
    assert res == {"imagenet-val total": pytest.approx(np.mean(np.array(want) == ds.class_idx)), "n": 6}
    half = imagenet_scores(model, ds, precision="fp16", templates=["a photo of a {}."])
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is never cast
    assert torch.allclose(half, scores, atol=2e-2)
    known = torch.zeros(6, 1000)
    known[torch.arange(6), torch.tensor([0, 1, 7, 500, 3, 999])] = 1
    assert imagenet_top1(known, ds)["imagenet-val total"] == pytest.approx(4 / 6)


def test_layout_errors(tmp_path, val_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imagenet_val(tmp_path / "nope")
    (tmp_path / "n00000001").mkdir()
    with pytest.raises(ValueError, match="1 WordNet-id class folders"):
        imagenet_val(tmp_path)
    with pytest.raises(KeyError, match="fp16"):
        imagenet_scores(None, imagenet_val(val_root), precision="half")
    with pytest.raises(FileNotFoundError, match="config.toml"):
        evaluate_run_imagenet(tmp_path, val_root)
