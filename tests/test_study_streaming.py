"""Streamed images (plan.SplitImages) give the controls the same numbers as images held in memory,
and capped mean-ablation references (data.samples.capped_rows) are the whole domain up to the cap."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from clipmech.data.samples import capped_rows
from clipmech.eval.zeroshot import embed_images
from clipmech.study import controls as SC


def test_capped_rows_keeps_everything_up_to_the_cap_and_samples_above_it():
    rows = np.array([9, 3, 7, 1, 5])
    assert np.array_equal(capped_rows(rows, None), rows)
    assert np.array_equal(capped_rows(rows, 5), rows)  # exactly at the cap: all, order kept
    four = capped_rows(rows, 4, seed=0)
    assert len(four) == 4 and set(four) < set(rows) and np.array_equal(four, np.sort(four))
    assert np.array_equal(four, capped_rows(rows, 4, seed=0))
    assert any(not np.array_equal(four, capped_rows(rows, 4, seed=s)) for s in range(1, 20))
    with pytest.raises(ValueError, match="at least 1 image"):
        capped_rows(rows, 0)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, random_discovery):
    """(in-memory RunAnalysis, streamed RunAnalysis, model, discovery circuits) on 19 emoji classes."""
    from clipmech.models import HookedCLIP
    from clipmech.models.configs import resolve_config
    from clipmech.study.plan import ImageStore, RunAnalysis
    from clipmech.study.quickstart import QuickstartOptions, Study, resolve_dataset
    from clipmech.study.registry import Registry

    tmp = tmp_path_factory.mktemp("stream")
    opts = QuickstartOptions(out=str(tmp), views=1, max_classes=19, n_c2=15, circuit_classes=2, circuit_steps=1,
                             sae_steps=10, progress=False)
    qs = Study(opts, registry=Registry(tmp / "registry"))
    qs.dataset, qs.test_domains, qs.c2 = resolve_dataset(opts)
    qs.store = ImageStore(qs.dataset, 32, tmp / "cache")
    torch.manual_seed(0)
    _, cfg = resolve_config("tiny-rn")
    model = HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=32))).eval()
    model.save_checkpoint(tmp / "epoch_1.pt", epoch=1)
    held = qs.run_analysis({"checkpoint_hash": "weights-0", "run_dir": str(tmp),
                            "checkpoint": str(tmp / "epoch_1.pt")}, None)
    streamed = RunAnalysis(held.source, held.opts, Registry(tmp / "registry_streamed"),
                           ImageStore(qs.dataset, 32, tmp / "cache_streamed", stream=True))
    discovery = random_discovery(held, model)
    return held, streamed, model, discovery


def test_split_images_equal_the_held_tensor(setting):
    from clipmech.study.plan import SplitImages

    held, streamed, model, _ = setting
    full, lazy = held.images("test"), streamed.images("test")
    assert isinstance(lazy, SplitImages) and not streamed.store.cached("test") and len(lazy) == len(full)
    rows = np.array([5, 0, 5, len(full) - 1])  # any order, repeats, the last row
    assert torch.equal(lazy[rows], full[rows])
    assert torch.equal(lazy[3:9], full[3:9]) and torch.equal(lazy[torch.tensor([2, 1])], full[[2, 1]])
    assert lazy[np.zeros(0, np.int64)].shape == (0, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(embed_images(model, lazy, batch_size=7), embed_images(model, full, batch_size=7))
    with pytest.raises(TypeError, match="1-d integer row array"):
        lazy[np.ones(len(lazy), bool)]


def test_streamed_controls_equal_held_ones(setting):
    held, streamed, model, discovery = setting
    t = next(iter(discovery))
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (NaN-safe)
    assert same(SC.sae_controls(streamed, model, "weights-0", t), SC.sae_controls(held, model, "weights-0", t))
    assert same(SC.faithfulness_controls(streamed, model, discovery), SC.faithfulness_controls(held, model, discovery))


def test_a_reference_cap_at_the_domain_size_changes_nothing_and_below_it_changes_the_mean(setting):
    held, _, model, discovery = setting
    ds = held.dataset
    test = ds.indices(split="test")
    smallest = min(int((ds.domain_idx[test] == ds.domains.index(d)).sum()) for d in discovery)
    largest = max(int((ds.domain_idx[test] == ds.domains.index(d)).sum()) for d in discovery)
    base = SC.faithfulness_controls(held, model, discovery)
    at_cap = dataclasses.replace(held, opts=dataclasses.replace(held.opts, reference_images=largest))
    assert json.dumps(SC.faithfulness_controls(at_cap, model, discovery)) == json.dumps(base)
    below = dataclasses.replace(held, opts=dataclasses.replace(held.opts, reference_images=smallest - 1))
    capped = SC.faithfulness_controls(below, model, discovery)
    mean_auc = lambda r: [r["domains"][d]["mean"]["auc"] for d in discovery]  # noqa: E731
    assert mean_auc(capped) != mean_auc(base)
    resample = lambda r: [r["domains"][d]["resample"] for d in discovery]  # noqa: E731
    assert json.dumps(resample(capped)) == json.dumps(resample(base))  # the cap touches mean ablation's reference only


def test_experiment_analyse_options_for_streaming_and_references():
    from clipmech.study.analyse import analysis_options
    from clipmech.train.config import ConfigError

    opts = analysis_options({"image_memory_gb": 0.5, "reference_images": 300})
    assert opts.preset().reference_images == 300
    assert "image_memory_gb" not in opts.key() and opts.key()["reference_images"] == 300
    assert analysis_options({}).key() == analysis_options({"image_memory_gb": 0.5}).key()
    with pytest.raises(ConfigError, match="reference_images"):
        analysis_options({"reference_images": 0})
    with pytest.raises(ConfigError, match="image_memory_gb"):
        analysis_options({"image_memory_gb": 0})
