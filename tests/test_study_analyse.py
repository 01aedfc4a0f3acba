"""clipmech.study.analyse without models: [analysis] options, per-cell caps, circuit matrices, and the
per-run config being the run's own."""
import numpy as np
import pytest

from clipmech.data.dataset import DomainDataset
from clipmech.study import analyse as A


def test_options_from_table_and_errors():
    opts = A.analysis_options({"circuit_steps": 3, "points": ["visual.layer1.0.hook_out"]}, device="cpu", workers=None)
    assert opts.circuit_steps == 3 and opts.points == ("visual.layer1.0.hook_out",) and opts.device == "cpu"
    assert opts.workers == 0  # None leaves the default
    with pytest.raises(ValueError, match=r"\[analysis\]: unknown key 'sae_epoch'; closest valid: 'sae_steps'"):
        A.analysis_options({"sae_epoch": 3})
    with pytest.raises(ValueError, match=r"\[analysis\] precision = 'int8'; choose one of fp32, bf16, fp16"):
        A.analysis_options({"precision": "int8"})
    with pytest.raises(ValueError, match=r"\[analysis\] device = 'tpu'; choose one of auto, cpu, cuda, cuda:N"):
        A.analysis_options({}, device="tpu")
    # what the results depend on, not how fast they are computed
    assert A.AnalysisOptions(workers=8, batch_size=7, device="cuda").key() == A.AnalysisOptions().key()
    assert A.AnalysisOptions(cka_boot=5).key() != A.AnalysisOptions().key()
    assert A.AnalysisOptions(paper_compat=True).key() != A.AnalysisOptions().key()
    opts = A.analysis_options({"paper_compat": True, "circuit_scope": "all"})
    assert opts.paper_compat and opts.circuit_scope == "all"
    assert A.analysis_options({"paper_compat": True}, paper_compat=None).paper_compat  # the CLI leaves it unset
    with pytest.raises(ValueError, match=r"\[analysis\] circuit_scope = 'c1'; choose one of c2, all"):
        A.analysis_options({"circuit_scope": "c1"})


def _ds():
    dom = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    cls = np.array([0, 0, 1, 0, 0, 0, 0, 1])
    return DomainDataset("t", ["real", "b"], ["x", "y"], domain_idx=dom, class_idx=cls, split=np.array(["test"] * 8),
                         images=np.zeros((8, 4, 4, 3), np.uint8))


def test_each_unit_keys_only_on_the_options_it_reads():
    base = A.analysis_options({})
    units = ("extract", "cka", "sae", "embeddings", "circuits/cat", "controls")
    key = lambda opts, u: A.unit_options(u, opts.key())  # noqa: E731

    def changed(**kw) -> set[str]:
        other = A.analysis_options(kw)
        return {u for u in units if key(other, u) != key(base, u)}

    assert changed(sae_lr=3e-3) == changed(sae_steps=10) == {"sae", "controls"}
    assert changed(circuit_method="eap_ig") == changed(circuit_steps=2) == {"circuits/cat", "controls"}
    assert changed(cka_boot=10) == {"cka", "controls"} and changed(embedding_images=5) == {"embeddings", "controls"}
    assert changed(reference_images=10) == changed(circuit_classes=3) == {"controls"}
    assert changed(points=["hook_image_embed"]) == changed(images_per_cell=3) == set(units)
    assert changed(batch_size=7, workers=0, image_memory_gb=1.0) == set()
    # every option a result depends on is read by the shared context, one unit or the controls alone
    placed = set(A._SHARED_OPTIONS).union(*A._UNIT_OPTIONS.values())
    controls_only = {"circuit_scope", "circuit_classes", "reference_images", "paper_compat"}
    assert set(base.key()) <= placed | controls_only


def test_cap_per_cell_keeps_the_first_rows_of_each_cell():
    ds = _ds()
    idx = np.arange(8)
    assert A._cap_per_cell(idx, ds, None) is idx
    assert A._cap_per_cell(idx, ds, 1).tolist() == [0, 2, 3]  # first of (real,x), (real,y), (b,x)
    assert A._cap_per_cell(idx, ds, 2).tolist() == [0, 1, 2, 3, 4, 7]
    assert A._cap_per_cell(idx, ds, 3).tolist() == idx.tolist()  # the largest cell (real,x) has exactly 3


def test_circuit_matrices_average_over_classes_present():
    def cls(name, node, edge):
        return {"class": name, "domains": ["a", "b"], "node": node, "edge": edge, "wl_h2": node}
    per_class = [cls("x", [[1.0, 0.5], [0.5, 1.0]], [[1.0, 0.2], [0.2, 1.0]]),
                 cls("y", [[1.0, None], [None, None]], [[1.0, None], [None, None]]),
                 cls("z", [[1.0, 0.3], [0.3, 1.0]], [[1.0, 0.4], [0.4, 1.0]])]
    m = A.mean_circuit_matrices(per_class, ["x", "z"])
    assert m["classes"] == ["x", "y", "z"] and m["subsets"]["all"]["classes"] == 3
    assert m["node"][0][1] == pytest.approx(0.4) and m["edge"][1][0] == pytest.approx(0.3)
    assert m["node"][1][1] == pytest.approx(1.0) and m["wl_h2"] == m["node"]
    assert m["subsets"]["C1"] == {"classes": 1, **{k: per_class[1][k] for k in ("node", "edge", "wl_h2")}}
    assert m["subsets"]["all"]["node"][0][0] == 1.0 and m["subsets"]["C2"]["node"] == m["node"]
    with pytest.raises(ValueError, match="no C2 class"):
        A.mean_circuit_matrices(per_class, ["w"])


def test_run_context_reads_the_runs_config(tmp_path):
    from clipmech.train.config import save_config, load_config
    run = tmp_path / "run"
    save_config(load_config({"model": {"name": "tiny-rn", "image_size": 48}, "train": {"epochs": 2}}), run / "config.toml")
    with pytest.raises(FileNotFoundError, match="epoch_2.pt is missing"):
        A.RunContext(run, A.AnalysisOptions())
    with pytest.raises(FileNotFoundError, match="config.toml not found"):
        A.RunContext(tmp_path / "nope", A.AnalysisOptions())


# ---------------------------------------------------------------- paper_compat through the units
CLASSES = ("apple", "axe", "banana", "bear", "cat", "dog", "eye", "fish", "tree")


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A run folder with an untrained 32 px tiny-rn as its final checkpoint, on a DomainNet-layout
    fixture where painting's test split lacks 'tree' (so painting's class list differs)."""
    import torch

    from clipmech.data.domainnet import DOMAINS
    from clipmech.data.synthetic import write_fake_domainnet
    from clipmech.models import HookedCLIP
    from clipmech.models.configs import resolve_config
    from clipmech.train.config import load_config, save_config
    tmp = tmp_path_factory.mktemp("compat")
    counts = {(d, c, s): (0 if (d, c, s) == ("painting", "tree", "test") else 2)
              for d in DOMAINS for c in CLASSES for s in ("train", "test")}
    root = write_fake_domainnet(tmp / "dn", counts, size=8)
    run = tmp / "run"
    save_config(load_config({"model": {"name": "tiny-rn", "image_size": 32}, "data": {"dataset": str(root)},
                             "mixture": {"test_classes": list(CLASSES[:4])}, "train": {"epochs": 1},
                             "eval": {"templates": "simple"}}), run / "config.toml")
    _, mcfg = resolve_config("tiny-rn")
    mcfg = {**mcfg, "vision_cfg": {**mcfg["vision_cfg"], "image_size": 32}}
    torch.manual_seed(0)
    model = HookedCLIP.from_config(mcfg)
    model.save_checkpoint(run / "epoch_1.pt", epoch=1)
    return run


def test_paper_compat_reaches_cka_and_circuits_and_is_recorded(untrained_run, tmp_path):
    """[analysis] paper_compat on the study path changes exactly the documented numbers: CKA all / C1
    rows of pairs without painting (painting's class list), edge Jaccard (wrap-around edges) and WL
    "h2" (3 iterations); C2 CKA and node Jaccard stay; every unit result and unit key records it."""
    base = dict(circuit_scope="all", circuit_images=2, circuit_steps=2, cka_boot=3, cka_min_rows=4, device="cpu",
                points=("visual.layer2.0.hook_out", "visual.attnpool.hook_out"))
    out = {}
    for compat in (False, True):
        opts = A.AnalysisOptions(paper_compat=compat, **base)
        ctx = A.RunContext(untrained_run, opts)
        assert ctx.paper_compat is compat and ctx.unit_key("cka")["paper_compat"] is compat
        assert A.circuit_classes(ctx) == list(CLASSES)  # C2 first, then the rest: the paper's scope
        A.unit_extract(str(untrained_run), opts, str(tmp_path / "shards"))
        out[compat] = (A.unit_cka(str(untrained_run), opts, str(tmp_path / "shards")),
                       A.unit_circuits(str(untrained_run), opts, "apple"))
    (cka0, circ0), (cka1, circ1) = out[False], out[True]
    assert (cka0["paper_compat"], cka1["paper_compat"]) == (False, True)
    assert (cka0["class_list_domain"], cka1["class_list_domain"]) == (None, "painting")
    assert cka1["results"]["C2"] == cka0["results"]["C2"]
    for subset in ("all", "C1"):
        for pair, r0 in cka0["results"][subset]["linear"].items():
            r1 = cka1["results"][subset]["linear"][pair]
            if "painting" in pair:
                assert r1 == r0, pair
            else:  # 'tree' is left out of every pair, as the paper's leftover loop variable does
                assert (r0["n_classes"], r1["n_classes"]) == ((9, 8) if subset == "all" else (5, 4)), pair
                assert r1["cka"] != r0["cka"], pair
    assert (circ0["paper_compat"], circ1["paper_compat"]) == (False, True)
    assert circ1["node"] == circ0["node"] and circ1["images"] == circ0["images"] == {d: 2 for d in circ0["domains"]}
    off = [(a, b) for a in range(6) for b in range(6) if a != b]
    assert all(circ1["edge"][a][b] != circ0["edge"][a][b] for a, b in off if circ0["edge"][a][b] < 1)
    assert any(circ1["wl_h2"][a][b] != circ0["wl_h2"][a][b] for a, b in off)


def test_analyze_circuits_and_the_study_give_identical_node_jaccard(untrained_run, tmp_path):
    """One definition of a class's domain x domain node similarity: `clipmech analyze circuits RUN` and the
    study's circuit unit agree exactly for the same model, class and images (2 per cell, seed 42)."""
    import json

    from clipmech.cli import main
    opts = A.AnalysisOptions(circuit_images=2, circuit_steps=2, device="cpu")
    study = A.unit_circuits(str(untrained_run), opts, "apple")
    assert main(["analyze", "circuits", str(untrained_run), "--classes", "apple", "--n-images", "2", "--steps", "2",
                 "--device", "cpu", "--no-faithfulness", "--out", str(tmp_path)]) == 0
    sims = json.loads((tmp_path / "circuits_epoch1" / "similarity.json").read_text())
    assert sims["domains"] == study["domains"]
    assert sims["node_jaccard"]["mean"] == study["node"]
    assert sims["edge_jaccard"]["mean"] == study["edge"]
