"""benchmarks/gpu_check.py --cpu-dry-run: every item runs on tiny models on CPU and appends its record."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("open_clip_train", reason="the trainers item runs open_clip_train.main (dev extra)")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cpu_dry_run_measures_every_item(tmp_path):
    gpu_check = _load()
    out = tmp_path / "gpu.jsonl"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out)]) == 0
    recs = _records(out)
    assert recs[0]["item"] == "run" and recs[0]["dry_run"] is True
    assert not [r for r in recs if "error" in r]
    by = {}
    for r in recs[1:]:
        by.setdefault(r["item"], []).append(r)
    assert list(by) == list(gpu_check.ITEMS)  # priority order kept, one block per item
    steps = by["train-step"]
    assert [(r["compile"], r["channels_last"]) for r in steps] == [(False, False), (False, True)]
    assert all(r["images_per_s"] > 0 and r["tflop_per_step"] > 0 and r["mfu"] is None for r in steps)
    assert [r["trainer"].split()[0] for r in by["trainers"]] == ["clipmech", "open_clip_train"]
    assert all(r["images_per_s"] > 0 for r in by["trainers"])
    assert by["zeroshot"][0]["images"] == 32 and by["zeroshot"][0]["images_per_s"] > 0
    circuit = by["circuit"][0]
    assert circuit["pairs_measured"] == circuit["pairs"] == 9  # tiny-rn: 10 analysis points
    assert circuit["hours_2070_cells"] == pytest.approx(circuit["cell_seconds"] * 2070 / 3600)
    assert by["cka"][0]["images"] == 32 and by["cka"][0]["points"] == 9


def test_cap_stops_after_first_measurement_and_extrapolates(tmp_path):
    gpu_check = _load()
    out = tmp_path / "gpu.jsonl"
    out.write_text(json.dumps({"item": "earlier"}) + "\n")
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out), "--items", "circuit", "--cap", "0"]) == 0
    recs = _records(out)
    assert recs[0] == {"item": "earlier"}  # appended, never overwritten
    c = recs[-1]
    assert c["pairs_measured"] == 1 and len(c["pairs_detail"]) == 1
    d = c["pairs_detail"][0]
    assert c["edge_seconds_extrapolated"] == pytest.approx(d["seconds"] * d["top10"] / d["sampled"] * c["pairs"])
