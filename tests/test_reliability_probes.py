"""The probe table of issue 24: bad inputs and faults across `analyze --pretrained`, `report`,
`experiment run|analyse` and the Python loaders, each with the outcome it must have (exit code and
one line naming the thing and the fix, or the right behaviour). No training: weight files are
random tiny models saved here, experiment files are written here, and every probe fails (or
succeeds) before any unit would need a trained run."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipmech.cli import main
from clipmech.errors import BadInputError, CheckpointError, ConfigError, UserError
from clipmech.launch import LaunchOptions, Unit, run_unit, run_units
from clipmech.locks import UnitLockedError, acquire, lock_path, release
from clipmech.models import HookedCLIP
from clipmech.models.configs import resolve_config

SOURCE = """
[experiment]
name = "src"
kind = "clip"
[base.model]
name = "tiny-rn"
image_size = 32
[base.data]
dataset = "{domainnet}"
[base.train]
epochs = 1
[matrix]
"mixture.setup" = ["cg_high"]
"mixture.test_domain" = ["clipart"]
[launch]
nproc_per_node = 1
"""

ANALYSIS = """
[experiment]
name = "mech"
kind = "analysis"
[analysis]
source = "src.toml"
circuit_steps = 2
cka_min_rows = 4
device = "cpu"
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Weight files (good, empty, random, truncated, another architecture, a trainer's 32 px
    checkpoint, one holding Python objects) and experiment files."""
    d = tmp_path_factory.mktemp("probes")
    torch.manual_seed(0)
    rn = HookedCLIP.from_config("tiny-rn")
    torch.save(rn.to_open_clip().state_dict(), d / "rn.pt")
    torch.save(HookedCLIP.from_config("tiny-vit").to_open_clip().state_dict(), d / "vit.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    good = (d / "rn.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "folder").mkdir()
    (d / "with_objects.pt").write_bytes(b"")
    torch.save({"state_dict": rn.to_open_clip().state_dict(), "rng": np.random.get_state()}, d / "with_objects.pt")
    _, cfg32 = resolve_config("tiny-rn")
    cfg32["vision_cfg"]["image_size"] = 32
    HookedCLIP.from_config(cfg32).save_checkpoint(d / "run32.pt")  # the trainer's format, 32 px
    (d / "half.safetensors").write_bytes((1000).to_bytes(8, "little") + b'{"a": 1}')
    (d / "src.toml").write_text(SOURCE)
    (d / "mech.toml").write_text(ANALYSIS)
    return d


def _exp(text: str, name: str = "exp.toml", **edits: str):
    """An experiment file: `text` with each 'old=>new' edit applied (kwargs are only labels)."""
    def make(d: Path, tmp: Path) -> list[str]:
        body = text
        for edit in edits.values():
            old, _, new = edit.partition("=>")
            assert old in body or not old, old
            body = body.replace(old, new, 1) if old else body + new
        (tmp / name).write_text(body)
        if name != "src.toml":
            (tmp / "src.toml").write_text(SOURCE)
        return [str(tmp / name)]
    return make


def _run(*edits: str):
    make = _exp(SOURCE, "src.toml", **{f"e{i}": e for i, e in enumerate(edits)})
    return lambda d, tmp: ["experiment", "run", *make(d, tmp), "--data", "domainnet=/data/dn", "--out", str(tmp / "out"),
                           "--dry-run"]


def _analyse(*edits: str, flags: tuple[str, ...] = ()):
    make = _exp(ANALYSIS, "mech.toml", **{f"e{i}": e for i, e in enumerate(edits)})
    return lambda d, tmp: ["experiment", "analyse", *make(d, tmp), "--data", "domainnet=/data/dn",
                           "--out", str(tmp / "out"), *flags]


def _pretrained(name: str, model: str = "tiny-rn"):
    return lambda d, tmp: ["analyze", "cka", "--model", model, "--pretrained", str(d / name), "--dataset", "emoji",
                           "--out", str(tmp / "out")]


def _report(content: bytes | None):
    def make(d: Path, tmp: Path) -> list[str]:
        if content is not None:
            (tmp / "results.json").write_bytes(content)
        return ["report", str(tmp)]
    return make


def _argv(*args: str):
    return lambda d, tmp: [a.format(d=d, tmp=tmp) for a in args]


# (id, argv builder, exit code, message pattern): every case ends in one line and writes nothing
CLI_PROBES = [
    # analyze --pretrained FILE: clipmech's checkpoint checks (defect 1)
    ("pretrained-empty", _pretrained("empty.pt"), 4, r"empty.pt is empty \(0 bytes\)"),
    ("pretrained-random-bytes", _pretrained("random.pt"), 4, r"random.pt is not a PyTorch checkpoint"),
    ("pretrained-truncated", _pretrained("truncated.pt"), 4, r"truncated.pt is truncated \(\d+ bytes"),
    ("pretrained-missing", _pretrained("missing.pt"), 1, r"weight file .*missing.pt does not exist"),
    ("pretrained-folder", _pretrained("folder"), 1, r"folder is a folder, not a weight file"),
    ("pretrained-other-architecture", _pretrained("vit.pt"), 4,
     r"vit.pt \(preset tiny-rn\) does not match the architecture \(another model\?\); missing keys"),
    ("pretrained-python-objects", _pretrained("with_objects.pt"), 4, r"holds Python objects besides tensors"),
    ("pretrained-safetensors-truncated", _pretrained("half.safetensors"), 4, r"not a complete safetensors file"),
    ("pretrained-preset-tag", lambda d, tmp: ["analyze", "cka", "--model", "tiny-rn", "--pretrained", "openai",
                                              "--dataset", "emoji", "--out", str(tmp / "out")], 1,
     r"preset 'tiny-rn' has no pretrained tags; pass pretrained= a local weight file"),
    ("pretrained-without-model", _argv("analyze", "cka", "--pretrained", "{d}/rn.pt", "--dataset", "emoji"), 1,
     r"--pretrained needs --model NAME"),
    ("pretrained-unknown-model", _pretrained("rn.pt", model="tiny-rnn"), 1, r"unknown model 'tiny-rnn'.*'tiny-rn'"),
    # clipmech report: JSON the user points at (defect 5)
    ("report-no-results", _report(None), 1, r"results.json does not exist; RUN_DIR must be a folder written by"),
    ("report-truncated-json", _report(b'{\n  "models": [\n    {"setup": "lod",\n'), 1,
     r"results.json is not valid JSON \(line 4, column 1: Expecting .*\); restore it from a backup or rerun"),
    ("report-empty-file", _report(b""), 1, r"results.json is not valid JSON \(line 1, column 1"),
    ("report-not-utf8", _report(b'{"a": "\xff"}'), 1, r"results.json is not valid JSON \(not UTF-8 text at byte 7\)"),
    ("report-json-list", _report(b"[1, 2]"), 1, r"holds a JSON list, not the results object"),
    ("report-no-models", _report(b'{"models": []}'), 1, r"no 'models' rows to recompute"),
    ("report-n-boot-low", lambda d, tmp: _report(b'{"models": []}')(d, tmp) + ["--n-boot", "99"], 2,
     r"config: --n-boot must be >= 100, got 99"),
    # experiment run: every table and key checked before anything runs (defect 3)
    ("run-experiment-key-typo", _run('name = "src"=>name = "src"\nbase_tvs = "{imagenet_captions}"'), 2,
     r"\[experiment\]: unknown key 'base_tvs'; closest valid: 'base_tsv'"),
    ("run-table-typo", _run("[launch]=>[lunch]"), 2, r"src.toml: unknown table 'lunch'; closest valid: 'launch'"),
    ("run-not-toml", _run('[matrix]=>[matrix'), 2, r"experiment file .*src.toml is not valid TOML: .*line \d+"),
    ("run-no-name", _run('name = "src"\n=>'), 2, r"\[experiment\] needs a name"),
    ("run-bad-kind", _run('kind = "clip"=>kind = "clipp"'), 2,
     r"\[experiment\] kind = 'clipp'; choose one of clip, supervised, analysis"),
    ("run-matrix-key-typo", _run('"mixture.setup"=>"mixture.setpu"'), 2,
     r"\[matrix\] 'mixture.setpu': unknown key of \[mixture\] 'setpu'; closest valid: 'setup'"),
    ("run-matrix-section-typo", _run('"mixture.setup"=>"mixtur.setup"'), 2,
     r"unknown section 'mixtur'; closest valid: 'mixture'"),
    ("run-matrix-not-list", _run('["cg_high"]=>"cg_high"'), 2, r"matrix entry 'mixture.setup' must be"),
    ("run-base-key-typo", _run("epochs = 1=>epoch = 1"), 2,
     r"src.toml: \[base\] unknown config key in \[train\] 'epoch'; closest valid: 'epochs'"),
    ("run-base-value", _run("image_size = 32=>image_size = 0"), 2, r"\[base\] \[model\] image_size = 0 is out of range"),
    ("run-launch-key-typo", _run("nproc_per_node = 1=>nproc_per_node = 1\npartiton = \"gpu\""), 2,
     r"\[launch\]: unknown key 'partiton'; closest valid: 'partition'"),
    ("run-launch-time", _run("nproc_per_node = 1=>nproc_per_node = 1\ntime_min = 0"), 2,
     r"\[launch\] time_min = 0 is out of range; it must be >= 1"),
    ("run-missing-data", lambda d, tmp: _run()(d, tmp)[:3] + ["--out", str(tmp / "out"), "--dry-run"], 2,
     r"needs data path\(s\) \['domainnet'\]; pass --data domainnet=/path"),
    ("run-analysis-file", lambda d, tmp: ["experiment", "run", *_exp(ANALYSIS, "mech.toml")(d, tmp)], 2,
     r"experiment 'mech' is an analysis; run it with `clipmech experiment analyze`"),
    ("run-unsupported", _run('kind = "clip"=>kind = "clip"\nunsupported = "needs CC12M"'), 1,
     r"cannot run yet: needs CC12M"),
    ("run-file-missing", _argv("experiment", "run", "{tmp}/nope.toml", "--out", "{tmp}/out"), 1,
     r"experiment file .*nope.toml does not exist"),
    # experiment analyse: every option checked before the first unit (defect 4)
    ("analyse-cka-min-rows-3", _analyse("cka_min_rows = 4=>cka_min_rows = 3"), 2,
     r"\[analysis\] cka_min_rows = 3 is out of range; it must be >= 4"),
    ("analyse-workers-negative", _analyse(flags=("--workers", "-1")), 2,
     r"\[analysis\] workers = -1 is out of range; it must be >= 0"),
    ("analyse-device-unknown", _analyse(flags=("--device", "tpu")), 2,
     r"\[analysis\] device = 'tpu'; choose one of auto, cpu, cuda, cuda:N"),
    ("analyse-key-typo", _analyse("circuit_steps=>circuit_stepz"), 2,
     r"\[analysis\]: unknown key 'circuit_stepz'; closest valid: 'circuit_steps'"),
    ("analyse-type", _analyse("circuit_steps = 2=>circuit_steps = \"ten\""), 2,
     r"\[analysis\] circuit_steps = 'ten' is a str; it must be a whole number"),
    ("analyse-sae-steps-0", _analyse("device = \"cpu\"=>device = \"cpu\"\nsae_steps = 0"), 2,
     r"\[analysis\] sae_steps = 0 is out of range; it must be >= 1"),
    ("analyse-sae-epochs", _analyse("device = \"cpu\"=>device = \"cpu\"\nsae_epochs = 30"), 2,
     r"\[analysis\] sae_epochs was replaced by sae_steps"),
    ("analyse-paper-compat-string", _analyse("device = \"cpu\"=>device = \"cpu\"\npaper_compat = \"yes\""), 2,
     r"\[analysis\] paper_compat = 'yes' is a str; it must be true or false"),
    ("analyse-training-file", lambda d, tmp: ["experiment", "analyse", *_exp(SOURCE, "src.toml")(d, tmp)], 2,
     r"src.toml is not an analysis experiment"),
    ("analyse-source-missing", _analyse('source = "src.toml"=>source = "gone.toml"'), 1,
     r"experiment file .*gone.toml does not exist"),
    ("analyse-untrained-source", _analyse(), 1, r"has not finished training; run `clipmech experiment run"),
]
if not torch.cuda.is_available():
    CLI_PROBES.append(("analyse-cuda-without-gpu", _analyse(flags=("--device", "cuda")), 2,
                       r"\[analysis\] device = 'cuda' but this machine has no usable CUDA GPUs; use --device cpu"))


@pytest.mark.parametrize("case", CLI_PROBES, ids=[c[0] for c in CLI_PROBES])
def test_cli_probe(files, tmp_path, capsys, case):
    _, make, code, pattern = case
    argv = make(files, tmp_path)
    got = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("clipmech: error: ") and re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the fault is found


# ---- the Python loaders (HookedCLIP.from_pretrained / from_checkpoint) -----------------------

# (id, model name ("OC": the registered open_clip name), file, exception, message pattern)
LOADER_PROBES = [
    ("oc-empty", "OC", "empty.pt", CheckpointError, r"is empty \(0 bytes\)"),
    ("oc-random", "OC", "random.pt", CheckpointError, r"is not a PyTorch checkpoint"),
    ("oc-truncated", "OC", "truncated.pt", CheckpointError, r"is truncated"),
    ("oc-folder", "OC", "folder", BadInputError, r"is a folder, not a weight file"),
    ("oc-missing", "OC", "missing.pt", FileNotFoundError, r"neither a pretrained tag of clipmech-test-tiny-rn"),
    ("oc-other-architecture", "OC", "vit.pt", CheckpointError,
     r"weight file .*vit.pt does not match the architecture of clipmech-test-tiny-rn"),
    ("preset-empty", "tiny-rn", "empty.pt", CheckpointError, r"is empty \(0 bytes\)"),
    ("preset-other-architecture", "tiny-rn", "vit.pt", CheckpointError, r"does not match the architecture"),
    ("preset-clipmech-checkpoint-of-vit", "tiny-vit", "run32.pt", CheckpointError,
     r"holds another model than the preset 'tiny-vit' \(its config differs in .*vision_cfg"),
    ("checkpoint-folder", None, "folder", BadInputError, r"is a folder, not a weight file"),
]


@pytest.mark.parametrize("case", LOADER_PROBES, ids=[c[0] for c in LOADER_PROBES])
def test_loader_probe(files, tiny_open_clip_name, case):
    _, name, file, error, pattern = case
    with pytest.raises(error, match=pattern):
        if name is None:
            HookedCLIP.from_checkpoint(files / file)
        else:
            HookedCLIP.from_pretrained(tiny_open_clip_name if name == "OC" else name, files / file)


def test_clipmech_training_checkpoint_loads_at_its_own_image_size(files):
    model = HookedCLIP.from_pretrained("tiny-rn", files / "run32.pt")
    assert model.image_size == 32 and model.preprocess_cfg["size"] == 32
    same = HookedCLIP.from_checkpoint(files / "run32.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert HookedCLIP.from_pretrained("tiny-rn", files / "rn.pt").image_size == 64  # a plain state dict: the preset's


def test_offline_download_retries_collapse_to_one_line_and_one_error(monkeypatch, capsys):
    import open_clip

    seen = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    def offline(*args, **kwargs):  # what huggingface_hub and open_clip log without a network
        log = logging.getLogger("huggingface_hub.utils._http")
        for i in range(1, 6):
            log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x")
            log.warning("Retrying in %ss [Retry %s/5].", 2 ** (i - 1), i)
        logging.error("Failed to download weights for tag 'openai': no network")
        raise RuntimeError("Failed to download weights for tag 'openai': Failed to download file (x.bin)")
    monkeypatch.setattr(open_clip, "create_model", offline)
    handler = Record()
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(BadInputError, match=r"could not download the weights 'openai' of RN50 \(offline.*pass a "
                                                 r"local weight file"):
            HookedCLIP.from_pretrained("RN50", "openai")
        logging.getLogger("huggingface_hub.utils._http").warning("after the download")  # filters are gone again
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == ["after the download"]
    assert capsys.readouterr().err == ("clipmech: download failed ('[Errno -2] Name or service not known'); retrying "
                                       "quietly for about a minute (HF_HUB_OFFLINE=1 skips downloads)\n")


# ---- units: corrupt outputs, locks, two processes (defects 2 and 5) ---------------------------

def _units(root: Path, n: int, seconds: float = 0.0) -> list[Unit]:
    return [Unit(f"u{i}", str(root / f"u{i}"), time.sleep, (seconds,)) for i in range(n)]


def _starts(unit: Unit) -> int:
    return unit.log.read_text().count(": start ") if unit.log.exists() else 0


@pytest.mark.parametrize("damage,bad_file", [("result", "result.json"), ("done", "done")])
def test_corrupt_unit_output_reruns_the_unit_with_a_notice_naming_the_file(tmp_path, capsys, damage, bad_file):
    units = _units(tmp_path, 2)
    run_units(units, LaunchOptions())
    path = Path(units[0].folder) / bad_file
    path.write_text('{\n  "a": 1,\n')  # cut off mid-write (by a copy, not by clipmech's atomic writer)
    assert not units[0].done and units[1].done
    capsys.readouterr()
    assert run_units(units, LaunchOptions(), stage="s") == [None, None]
    err = capsys.readouterr().err
    assert re.search(rf"clipmech: .*u0/{bad_file} is not valid JSON \(Expecting .*line 3 column 1.*\); unit u0 runs "
                     "again", err), err
    assert "[s] 1/2 units finished, 1 to run" in err
    assert [_starts(u) for u in units] == [2, 1] and units[0].done


def test_a_unit_held_by_a_live_process_is_skipped_reported_and_waited_for(tmp_path, capsys):
    units = _units(tmp_path, 3)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = lock_path(units[1].folder, "unit")
        Path(units[1].folder).mkdir(parents=True)
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": 0, "command": "other"}))
        with pytest.raises(UnitLockedError, match=rf"1 units were still being computed by other processes after 0 min: "
                                                  rf"u1 \(pid {holder.pid} on host"):
            run_units(units, LaunchOptions(wait_min=0.0, poll_s=0.01), stage="s")
        err = capsys.readouterr().err
        assert f"[s] u1: skipped, pid {holder.pid} on host" in err and "waiting up to 0 min for 1 units" in err
        assert [_starts(u) for u in units] == [1, 0, 1]  # the held unit was not computed here
    finally:
        holder.kill()
        holder.wait()
    # its holder died: the lock is stale, taken over, and the unit computed once
    assert run_units(units, LaunchOptions(poll_s=0.01), stage="s") == [None, None, None]
    assert "removing the stale lock" in capsys.readouterr().err
    assert [_starts(u) for u in units] == [1, 1, 1] and not path.exists()


def test_run_unit_does_not_recompute_a_unit_finished_while_it_waited_for_the_lock(tmp_path):
    unit = _units(tmp_path, 1)[0]
    held = acquire(unit.folder, "unit", command="other")
    try:
        with pytest.raises(UnitLockedError, match="is in use \\(unit\\) by pid"):
            run_unit(unit)
    finally:
        release(held)
    run_unit(unit)
    assert _starts(unit) == 1


TWO_PROCESSES = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clipmech.launch import LaunchOptions, Unit, run_units
    root = Path(sys.argv[1])
    (root / f"ready-{sys.argv[2]}").write_text("")
    while not (root / "go").exists():  # both start once both have imported
        time.sleep(0.01)
    units = [Unit(f"u{i}", str(root / f"u{i}"), time.sleep, (0.3,)) for i in range(8)]
    run_units(units, LaunchOptions(poll_s=0.05), stage="two")
""")


def test_two_processes_on_one_output_split_the_units_and_compute_each_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(tmp_path), str(i)], stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    logs = sorted(tmp_path.glob("u*/log.txt"))
    assert len(logs) == 8 and all(p.read_text().count(": start ") == 1 for p in logs)  # each unit computed once
    ran_here = [len(re.findall(r"units done: u\d+ \|", e)) for e in errs]
    assert sum(ran_here) == 8 and min(ran_here) >= 1, errs  # the work was split
    assert all(len(re.findall(r"units done: u\d+ \(by another process\)", e)) == 8 - n for e, n in zip(errs, ran_here))
    assert not list(tmp_path.rglob(".clipmech-*.lock"))


def test_analysis_option_types_cover_every_option():
    from dataclasses import fields

    from clipmech.study.analyse import OPTION_TYPES, AnalysisOptions, analysis_options
    assert set(OPTION_TYPES) == {f.name for f in fields(AnalysisOptions)}
    assert analysis_options({"cka_min_rows": 4, "workers": 0, "cka_boot": 0}).cka_min_rows == 4  # bounds allowed
    with pytest.raises(ConfigError, match=r"cka_min_rows = 3 is out of range"):
        analysis_options({}, cka_min_rows=3)


def test_corrupt_eval_results_name_the_file_and_the_fix(tmp_path):
    from clipmech.study.analyse import run_metrics
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text('{"0": {"a": 1},')
    (ev / "details.json").write_text("{}")
    with pytest.raises(BadInputError, match=rf"{ev}/results.json is not valid JSON \(line 1, column 16: .*\); "
                                            rf"evaluate the run again with `clipmech eval {tmp_path}`"):
        run_metrics(tmp_path)


def test_every_user_error_maps_to_its_exit_code():
    from clipmech.cli import describe_error
    from clipmech.errors import FileSystemError, UnitBusyError
    assert describe_error(ConfigError("x"), None) == ("config: x", 2)
    assert describe_error(CheckpointError("x"), None) == ("x", 4)
    assert describe_error(UnitBusyError("x"), None) == ("x", 3)
    assert describe_error(BadInputError("x"), None) == ("x", 1)
    assert describe_error(FileSystemError(28, "disk full", "/o"), None) == ("disk full: /o (ENOSPC); free space or "
                                                                           "choose another output folder", 5)
    assert describe_error(ZeroDivisionError(), None) is None  # a bug keeps its traceback
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, UserError)


@pytest.mark.parametrize("damage", ["truncate-shard", "delete-meta", "corrupt-meta"])
def test_damaged_activation_shards_are_named_and_extracted_again(tmp_path, damage):
    from clipmech.analysis.activations import write_shards
    from clipmech.data.dataset import DomainDataset
    torch.manual_seed(0)
    model = HookedCLIP.from_config("tiny-rn").eval()
    n, point = 12, "hook_image_embed_normalized"
    ds = DomainDataset("toy", ["real", "sketch"], ["cat", "dog"], domain_idx=np.arange(n) % 2,
                       class_idx=(np.arange(n) // 2) % 2, split=np.array(["test"] * n),
                       images=np.random.default_rng(0).integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8))
    first = write_shards(model, ds, np.arange(n), [point], tmp_path, "m0", shard_rows=5)
    want = torch.cat([x for _, xs in first.iter_batches([point]) for x in [xs[point]]])
    shard = first.folder / point / "shard_00001.pt"
    if damage == "truncate-shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete-meta":
        (first.folder / point / "meta.json").unlink()
    else:
        (first.folder / "meta.json").write_text("{")
    with pytest.warns(RuntimeWarning, match=rf"activation shards {first.folder} are damaged \(.+\); extracting them again"):
        again = write_shards(model, ds, np.arange(n), [point], tmp_path, "m0", shard_rows=5)
    got = torch.cat([x for _, xs in again.iter_batches([point]) for x in [xs[point]]])
    assert again.folder == first.folder and torch.allclose(got, want)


def _bad_checkpoint(path: str) -> None:
    from clipmech.utils import read_checkpoint
    read_checkpoint(path)


def test_units_failing_on_a_user_fault_exit_with_its_code_and_crashes_with_1(tmp_path, capsys):
    from clipmech.cli import describe_error
    (tmp_path / "empty.pt").write_bytes(b"")
    bad = [Unit(f"b{i}", str(tmp_path / f"b{i}"), _bad_checkpoint, (str(tmp_path / "empty.pt"),)) for i in range(2)]
    with pytest.raises(UserError) as info:
        run_units(bad, LaunchOptions(), stage="s")
    message, code = describe_error(info.value, "experiment")
    assert code == 4 and message.startswith("2 of 2 s units failed:; b0: CheckpointError: checkpoint ")
    assert message.endswith("Fix the cause named above, then rerun the same command (finished units are skipped).")
    crash = [Unit("c", str(tmp_path / "c"), _bad_checkpoint, (None,))]  # a TypeError: a bug, not the user's fault
    with pytest.raises(RuntimeError, match="Rerun the same command") as info:
        run_units(bad + crash, LaunchOptions(), stage="s")
    assert describe_error(info.value, "experiment")[1] == 1


ANALYZE_PROBES = [  # (id, flags, pattern): options out of range stop before any model is loaded
    ("min-rows-3-unbiased", ["--min-rows", "3"], r"--min-rows = 3 is out of range; it must be >= 4"),
    ("batch-size-0", ["--batch-size", "0"], r"--batch-size = 0 is out of range; it must be >= 1"),
    ("n-boot-negative", ["--n-boot", "-1"], r"--n-boot = -1 is out of range; it must be >= 0"),
    ("device-unknown", ["--device", "tpu"], r"--device = 'tpu'; choose one of auto, cpu, cuda, cuda:N"),
    ("checkpoint-negative", ["--checkpoint", "-1"], r"--checkpoint = -1 is out of range"),
]


@pytest.mark.parametrize("case", ANALYZE_PROBES, ids=[c[0] for c in ANALYZE_PROBES])
def test_analyze_options_are_checked_before_the_model_loads(tmp_path, capsys, case, monkeypatch):
    import clipmech.analysis.source as S
    monkeypatch.setattr(S, "load_source", lambda args: pytest.fail("the model was loaded"))
    _, flags, pattern = case
    code = main(["analyze", "cka", str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    line = capsys.readouterr().err.strip()
    assert code == 2 and re.fullmatch(r"clipmech: error: config: " + pattern + ".*", line), line
    assert not (tmp_path / "out").exists()


def test_min_rows_bound_follows_the_estimator(tmp_path, capsys):
    from clipmech.cli import build_parser, check_analyze_options
    ok = build_parser().parse_args(["analyze", "cka", "r", "--estimator", "biased", "--min-rows", "2"])
    check_analyze_options(ok)  # the biased estimator is defined on 2 rows
    with pytest.raises(ConfigError, match="--min-rows = 1 is out of range; it must be >= 2"):
        check_analyze_options(build_parser().parse_args(["analyze", "cka", "r", "--estimator", "biased",
                                                         "--min-rows", "1"]))
    check_analyze_options(build_parser().parse_args(["analyze", "cka", "r", "--min-rows", "4"]))  # boundary
