"""clipmech.launch: idempotent units, failure reporting and resubmission, dry runs, [launch] options,
torchrun passthrough, and the same units through submitit's local executor (no SLURM needed)."""
import io
import json
import sys
from pathlib import Path

import pytest

from clipmech.errors import ConfigError

from clipmech.launch import LaunchOptions, Unit, run_unit, run_units, unit_result
from clipmech.launch.launcher import launch_options
from clipmech.launch.torchrun import run_command, torchrun_command


def _counting(path: str, value: int) -> dict:
    """A unit body that counts its calls in a file and fails on negative values."""
    p = Path(path)
    p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))
    print(f"working on {value}")
    if value < 0:
        raise ValueError(f"negative value {value}")
    return {"value": value * 2}


def test_unit_runs_once_logs_and_marks_done(tmp_path):
    calls = tmp_path / "calls"
    u = Unit("u", str(tmp_path / "u"), _counting, (str(calls), 3))
    assert not u.done
    assert run_unit(u) == {"value": 6}
    assert u.done and unit_result(u) == {"value": 6}
    assert "working on 3" in u.log.read_text() and "done in" in u.log.read_text()
    assert run_unit(u) == {"value": 6} and calls.read_text() == "1"  # finished: not run again
    assert json.loads((tmp_path / "u" / "done").read_text())["seconds"] >= 0


def test_failed_unit_is_reported_and_alone_rerun(tmp_path):
    calls = tmp_path / "calls"
    ok = Unit("ok", str(tmp_path / "ok"), _counting, (str(calls), 1))
    bad = Unit("bad", str(tmp_path / "bad"), _counting, (str(tmp_path / "calls_bad"), -1))
    stream = io.StringIO()
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 .*bad: ValueError: negative value -1.*Rerun the same command"):
        run_units([bad, ok], LaunchOptions(), stage="t", stream=stream)
    assert ok.done and not bad.done  # the other unit still ran
    assert "Traceback" in bad.log.read_text() and "ValueError" in bad.log.read_text()
    assert "[t] 2/2 units done: ok" in stream.getvalue() and "FAILED: bad" in stream.getvalue()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        unit_result(bad)
    fixed = Unit("bad", str(tmp_path / "bad"), _counting, (str(tmp_path / "calls_bad"), 2))
    stream = io.StringIO()
    assert run_units([fixed, ok], LaunchOptions(), stage="t", stream=stream) == [{"value": 4}, {"value": 2}]
    assert calls.read_text() == "1" and (tmp_path / "calls_bad").read_text() == "2"
    assert "[t] 1/2 units finished, 1 to run" in stream.getvalue()
    assert "[t] 2/2 units done: bad | elapsed" in stream.getvalue() and "ETA" in stream.getvalue()


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    units = [Unit(f"u{i}", str(tmp_path / f"u{i}"), _counting, (str(tmp_path / "calls"), i)) for i in range(2)]
    run_unit(units[0])
    stream = io.StringIO()
    assert run_units(units, LaunchOptions(launcher="slurm"), stage="p", dry_run=True, stream=stream) is None
    out = stream.getvalue()
    assert "[p] 1/2 units finished, 1 to run (slurm)" in out
    assert f"finished  u0  -> {tmp_path / 'u0'}" in out and f"to run    u1  -> {tmp_path / 'u1'}" in out
    assert (tmp_path / "calls").read_text() == "1"


def test_launch_options_from_table_and_flags():
    opts = launch_options({"nproc_per_node": 4, "partition": "gpu", "mem_gb": 64}, launcher="slurm", mem_gb=None,
                          time_min=30)
    assert (opts.launcher, opts.partition, opts.mem_gb, opts.time_min) == ("slurm", "gpu", 64, 30)
    with pytest.raises(ConfigError, match=r"\[launch\]: unknown key 'partiton'; closest valid: 'partition'"):
        launch_options({"partiton": "gpu"})
    with pytest.raises(ConfigError, match=r"\[launch\] launcher = 'pbs'; choose one of local, slurm"):
        launch_options({}, launcher="pbs")
    with pytest.raises(ConfigError, match=r"\[launch\] time_min = 0 is out of range; it must be >= 1"):
        launch_options({"time_min": 0})
    assert launch_options({"time_min": 1, "wait_min": 0}).wait_min == 0  # both bounds allowed


def test_torchrun_passthrough():
    one = torchrun_command("c.toml", "run", nproc=4)
    assert one[:4] == ["torchrun", "--nproc_per_node=4", "--nnodes=1", "--standalone"]
    two = torchrun_command("c.toml", "run", nproc=8, nnodes=2, rdzv={"rdzv_endpoint": "node1:29400", "rdzv_id": "j7"})
    assert "--nnodes=2" in two and "--standalone" not in two
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=node1:29400", "--rdzv-id=j7"} <= set(two)
    assert two[-6:] == ["train", "--config", "c.toml", "--out", "run", "--resume"]
    # without an endpoint the job's first host is filled in at run time
    assert "--rdzv-endpoint=$MASTER" in torchrun_command("c", "r", 1, nnodes=2)


def test_run_command_output_goes_to_the_unit_log(tmp_path):
    u = Unit("cmd", str(tmp_path / "cmd"), run_command, ([sys.executable, "-c", "print('from the child')"],))
    run_unit(u)
    assert "from the child" in u.log.read_text()
    with pytest.raises(RuntimeError, match="exit code 3"):
        run_command([sys.executable, "-c", "raise SystemExit(3)"])


def test_submitit_local_executor_runs_the_array_and_reports_failures(tmp_path):
    pytest.importorskip("submitit", reason="the slurm launcher needs the [slurm] extra (submitit)")
    good = Unit("good", str(tmp_path / "good"), run_command, ([sys.executable, "-c", "print('job ran')"],))
    bad = Unit("bad", str(tmp_path / "bad"), run_command, ([sys.executable, "-c", "raise SystemExit(5)"],))
    opts = LaunchOptions(launcher="slurm", cluster="local", folder=str(tmp_path / "submitit"), poll_s=0.5,
                         partition="ignored-by-local")
    stream = io.StringIO()
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 .*bad: job .*exit code 5"):
        run_units([good, bad], opts, stage="s", stream=stream)
    assert good.done and "job ran" in good.log.read_text()
    assert "submitted 2 jobs" in stream.getvalue() and "FAILED: bad" in stream.getvalue()
    assert any((tmp_path / "submitit").iterdir())  # submitit's own job files
