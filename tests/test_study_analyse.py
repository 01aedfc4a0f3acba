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
    with pytest.raises(ValueError, match=r"unknown \[analysis\] key\(s\) \['sae_epoch'\]; valid: .*sae_epochs"):
        A.analysis_options({"sae_epoch": 3})
    with pytest.raises(ValueError, match="precision 'int8'; valid: fp32, bf16, fp16"):
        A.analysis_options({"precision": "int8"})
    with pytest.raises(ValueError, match="device 'tpu'"):
        A.analysis_options({}, device="tpu")
    # what the results depend on, not how fast they are computed
    assert A.AnalysisOptions(workers=8, batch_size=7, device="cuda").key() == A.AnalysisOptions().key()
    assert A.AnalysisOptions(cka_boot=5).key() != A.AnalysisOptions().key()


def _ds():
    dom = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    cls = np.array([0, 0, 1, 0, 0, 0, 0, 1])
    return DomainDataset("t", ["real", "b"], ["x", "y"], domain_idx=dom, class_idx=cls, split=np.array(["test"] * 8),
                         images=np.zeros((8, 4, 4, 3), np.uint8))


def test_cap_per_cell_keeps_the_first_rows_of_each_cell():
    ds = _ds()
    idx = np.arange(8)
    assert A._cap_per_cell(idx, ds, None) is idx
    assert A._cap_per_cell(idx, ds, 1).tolist() == [0, 2, 3]  # first of (real,x), (real,y), (b,x)
    assert A._cap_per_cell(idx, ds, 2).tolist() == [0, 1, 2, 3, 4, 7]
    assert A._cap_per_cell(idx, ds, 3).tolist() == idx.tolist()  # the largest cell (real,x) has exactly 3


def test_circuit_matrices_average_over_classes_present():
    per_class = [{"class": "x", "domains": ["a", "b"], "node": [[1.0, 0.5], [0.5, 1.0]], "edge": [[1.0, 0.2], [0.2, 1.0]]},
                 {"class": "y", "domains": ["a", "b"], "node": [[1.0, None], [None, None]], "edge": [[1.0, None], [None, None]]},
                 {"class": "z", "domains": ["a", "b"], "node": [[1.0, 0.3], [0.3, 1.0]], "edge": [[1.0, 0.4], [0.4, 1.0]]}]
    m = A.mean_circuit_matrices(per_class)
    assert m["classes"] == ["x", "y", "z"]
    assert m["node"][0][1] == pytest.approx(0.4) and m["edge"][1][0] == pytest.approx(0.3)
    assert m["node"][1][1] == pytest.approx(1.0)


def test_run_context_reads_the_runs_config(tmp_path):
    from clipmech.train.config import save_config, load_config
    run = tmp_path / "run"
    save_config(load_config({"model": {"name": "tiny-rn", "image_size": 48}, "train": {"epochs": 2}}), run / "config.toml")
    with pytest.raises(FileNotFoundError, match="epoch_2.pt is missing"):
        A.RunContext(run, A.AnalysisOptions())
    with pytest.raises(FileNotFoundError, match="config.toml not found"):
        A.RunContext(tmp_path / "nope", A.AnalysisOptions())
