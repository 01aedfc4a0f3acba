"""The discovery-method comparison on quickstart models: CPR / CMD rows per (model, ablation,
method) and the exploratory overlap change, on a stand-in quickstart directory (untrained tiny-rn
checkpoints at 32 px, the embedded emoji data)."""
import json

import numpy as np
import pytest
import torch

from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config
from clipmech.study.circuit_validity import overlap_change, quickstart_validity

CONFIG = {"dataset": "emoji", "views": 1, "image_size": 32, "epochs": 1, "n_templates": 1, "max_classes": 24,
          "n_c2": 15, "test_domains": ["clipart"]}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs_valid")
    cfg = resolve_config("tiny-rn")[1]
    cfg["vision_cfg"]["image_size"] = 32
    models = []
    for s, acc in enumerate((0.1, 0.4, 0.2)):
        torch.manual_seed(s)
        HookedCLIP.from_config(cfg).save_checkpoint(out / "runs" / f"m{s}-0000abcd" / "epoch_1.pt", epoch=1)
        models.append({"model_id": f"m{s}", "run_id": f"m{s}", "setup": "cg_high", "seed": s, "test_domain": "clipart",
                       "c2_test_acc": acc})
    (out / "results.json").write_text(json.dumps({"config": CONFIG, "models": models}))
    return out


def test_cpr_cmd_rows_and_overlap_on_a_quickstart(quickstart):
    # the cheap methods: this checks the code path; the methods themselves are tested on planted circuits
    res = quickstart_validity(quickstart, methods=("paper_ig", "random"), ablations=("zero", "counterfactual"),
                              alternative="random", n_images=2, steps=2, fractions=(1, 10, 100),
                              domains=("clipart", "painting"))
    rows = res["rows"]
    assert {(r["model_id"], r["ablation"], r["method"]) for r in rows} == {
        (f"m{s}", a, m) for s in range(3) for a in ("zero", "counterfactual") for m in ("paper_ig", "random")}
    for r in rows:
        if r.get("f") is not None:
            assert r["f"][-1] == pytest.approx(1.0, abs=1e-6)  # all edges kept = the full model
            assert 0 <= r["cmd"] and r["fractions"] == [1, 10, 100]
    ov = res["overlap"]
    assert ov["n_models"] == 3 and set(ov["node"]) >= {"paper_ig", "random", "rho_paper", "rho_alt", "delta_rho", "ci95"}
    assert all(0 <= v <= 1 for v in ov["node"]["paper_ig"] + ov["edge"]["random"])
    assert "exploratory" in res["label"]


def test_overlap_change_known_answer():
    """Paper overlap ranks the models opposite to C2 accuracy (rho -1), the alternative the same way
    (rho +1): delta rho = 2 in every bootstrap draw without ties, so the CI is [2, 2] up to the draws
    where a resample repeats one model (rho undefined, dropped)."""
    models = [{"model_id": f"m{i}", "test_domain": "t", "c2_test_acc": acc} for i, acc in enumerate((0.1, 0.2, 0.3, 0.4))]
    overlap = []
    for i, m in enumerate(models):
        for method, share in (("paper_ig", 4 - i), ("alt", i + 1)):
            nodes = {"t": [f"n{j}" for j in range(5)], "o": [f"n{j}" for j in range(share)]}
            for d in ("t", "o"):
                overlap.append({"model_id": m["model_id"], "test_domain": "t", "domain": d, "class": "k",
                                "method": method, "nodes": nodes[d], "edges": [(0, j) for j in range(len(nodes[d]))]})
    res = overlap_change(overlap, models, "alt", boot=300)
    assert res["node"]["paper_ig"] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert res["node"]["rho_paper"] == pytest.approx(-1) and res["node"]["rho_alt"] == pytest.approx(1)
    assert res["node"]["delta_rho"] == pytest.approx(2)
    assert np.isfinite(res["node"]["ci95"]).all() and res["node"]["ci95"][1] == pytest.approx(2)
