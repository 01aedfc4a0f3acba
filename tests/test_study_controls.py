"""The per-run controls composition: SAEs see only training-split images."""
import numpy as np
import torch

from clipmech.eval.zeroshot import embed_images
from clipmech.study import controls as SC
from clipmech.study import saes


def test_sae_trains_on_training_images_only(tmp_path, monkeypatch):
    from clipmech.models import HookedCLIP
    from clipmech.models.configs import resolve_config
    from clipmech.study.plan import ImageStore
    from clipmech.study.quickstart import QuickstartOptions, Study, resolve_dataset
    from clipmech.study.registry import Registry

    opts = QuickstartOptions(out=str(tmp_path), views=1, max_classes=19, n_c2=15, sae_steps=10, progress=False)
    qs = Study(opts, registry=Registry(tmp_path / "registry"))
    qs.dataset, qs.test_domains, qs.c2 = resolve_dataset(opts)
    qs.store = ImageStore(qs.dataset, 32, tmp_path / "cache")
    torch.manual_seed(0)
    _, cfg = resolve_config("tiny-rn")
    model = HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=32)))
    model.save_checkpoint(tmp_path / "epoch_1.pt", epoch=1)
    study = qs.run_analysis({"checkpoint_hash": "weights-0", "run_dir": str(tmp_path),
                             "checkpoint": str(tmp_path / "epoch_1.pt")}, None)
    seen = []
    real_train = saes.train_sae
    monkeypatch.setattr(saes, "train_sae", lambda data, **kw: seen.append(data.clone()) or real_train(data, **kw))
    res = SC.sae_controls(study, model, "weights-0", qs.test_domains[0])
    assert len(seen) == 2 and all(torch.equal(x, seen[0]) for x in seen)
    assert len(seen[0]) == len(study.dataset.indices(split="train")) == res["n_train"]
    test_emb = embed_images(model, study.images("test"))
    # no held-out embedding is among the training rows
    d = torch.cdist(test_emb.double(), seen[0].double())
    assert float(d.min()) > 1e-6
    assert res["held_out"]["n"] == int(np.isin(study.dataset.class_idx[study.dataset.indices(split="test")],
                                               [study.dataset.classes.index(c) for c in study.c2]).sum())
