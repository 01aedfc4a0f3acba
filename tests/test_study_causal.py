"""The study's causal-test unit (issue 26): drawings in their four roles on the embedded emoji
data, and the leak guard firing when a discovery drawing is also ablated."""
from __future__ import annotations

import pytest
import torch

from clipmech.analysis.causal import CausalOptions
from clipmech.study.causal import study_causal_test


@pytest.fixture(scope="module")
def setting(tmp_path_factory, random_discovery):
    from clipmech.models import HookedCLIP
    from clipmech.models.configs import resolve_config
    from clipmech.study.plan import ImageStore
    from clipmech.study.quickstart import QuickstartOptions, Study, resolve_dataset
    from clipmech.study.registry import Registry

    tmp = tmp_path_factory.mktemp("causal")
    opts = QuickstartOptions(out=str(tmp), views=1, max_classes=19, n_c2=15, circuit_classes=2, circuit_steps=1,
                             progress=False)
    study = Study(opts, registry=Registry(tmp / "registry"))
    study.dataset, study.test_domains, study.c2 = resolve_dataset(opts)
    study.store = ImageStore(study.dataset, opts.image_size, tmp / "cache")
    torch.manual_seed(0)
    _, cfg = resolve_config("tiny-rn")
    model = HookedCLIP.from_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=32))).eval()
    discovery = random_discovery(study, model)
    return study, model, discovery


def test_study_causal_test_uses_every_held_out_drawing_and_names_classes(setting):
    study, model, discovery = setting
    t = study.test_domains[0]
    res = study_causal_test(study, model, discovery, t, CausalOptions(n_random=3, n_random_small=2, n_strata=2,
                                                                      n_derangements=1))
    ds = study.dataset
    assert set(res["classes"]) | set(res["skipped"]) == {ds.classes[k] for k in discovery[t]}
    test = ds.indices(split="test")
    for name, c in res["classes"].items():
        k = ds.classes.index(name)
        n = int(((ds.domain_idx[test] == ds.domains.index(t)) & (ds.class_idx[test] == k)
                 & (ds.view_idx[test] == 0)).sum())
        assert c["n_images"] == n >= 1 and set(c["primary"]) == {"mean", "resample"}
    assert res["finding"]["side"].startswith("greater")


def test_study_causal_test_refuses_a_leaked_drawing(setting, monkeypatch):
    study, model, discovery = setting
    ds, t = study.dataset, study.test_domains[0]
    k = next(iter(discovery[t]))
    train, test = ds.indices(split="train"), ds.indices(split="test")
    leaked = train[discovery[t][k].meta["rows"][0]]
    held = test[(ds.domain_idx[test] == ds.domains.index(t)) & (ds.class_idx[test] == k)][0]
    styles = ds.style_idx.copy()
    styles[held] = styles[leaked]  # the held-out drawing becomes another view of a discovery drawing
    monkeypatch.setattr(ds, "style_idx", styles)
    with pytest.raises(ValueError, match="also used for discovery"):
        study_causal_test(study, model, discovery, t, CausalOptions(n_random=2, n_random_small=1, n_strata=2,
                                                                   n_derangements=1))
