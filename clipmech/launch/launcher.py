"""Run a list of units here (`local`) or as SLURM job arrays through submitit (`slurm`).

Finished units are skipped; the rest run once. A unit whose stored result no longer parses runs
again, with a notice naming the file. A unit another live process is computing (its lock is held:
a second command on the same output) is skipped and reported; after its own units this process
waits for those, up to `wait_min` minutes, and takes over any whose holder failed or died, so two
processes on one output split the work and never compute a unit twice. On SLURM each group of
units with the same resources becomes one job array (`executor.map_array`); the command waits for
the array, printing units done / total with an ETA. Failed units are listed with their logs:
rerunning the same command resubmits only them (when every failure is a user fault, the error
carries its exit code and asks to fix the cause first). submitit's own job files (sbatch script, pickles, stdout/stderr) go to `<folder>/%j`.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from clipmech.checks import check_keys, check_typed
from clipmech.errors import ConfigError, UserError
from clipmech.launch.units import Unit, compute_unit, corrupt_outputs, run_unit, unit_result
from clipmech.locks import UnitLockedError, describe_holder, lock_path, read_holder

LAUNCHERS = ("local", "slurm")
Failure = tuple[Unit, str, "BaseException | None"]  # (unit, why, the error when it ran in this process)


@dataclass(frozen=True)
class LaunchOptions:
    """How units become processes. SLURM settings are ignored by `local`.

    gpus_per_job None: each unit's own `gpus` (0 for CPU-only analysis units, [launch]
    nproc_per_node for training). cluster: submitit cluster name; None means "slurm", "local" runs
    the same job arrays as local processes (submitit's local executor; used by the tests).
    """

    launcher: str = "local"
    partition: str | None = None
    account: str | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int = 8
    mem_gb: int | None = None
    time_min: int = 240
    max_parallel: int | None = None
    wait_min: float = 240.0  # how long to wait for units another process is computing
    cluster: str | None = None
    folder: str = "submitit"
    poll_s: float = 2.0


# [launch] keys that configure the trainer's torchrun rather than the scheduler
TORCHRUN_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_backend", "rdzv_id")


def launch_options(table: Mapping[str, Any], **overrides: Any) -> LaunchOptions:
    """LaunchOptions from an experiment's [launch] table plus command-line overrides (None = unset).

    Unknown keys raise ConfigError naming the closest valid one, so a typo never falls back to a
    default; counts and times must be positive (cpus_per_job, time_min, ...) or >= 0 (gpus_per_job)."""
    valid = {f.name for f in fields(LaunchOptions)} - {"folder", "poll_s"}
    check_keys("[launch]", table, valid | set(TORCHRUN_KEYS))
    opts = LaunchOptions(**{k: v for k, v in table.items() if k in valid})
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    if opts.launcher not in LAUNCHERS:
        raise ConfigError(f"[launch] launcher = {opts.launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    check_launch_numbers(opts)
    return opts


def check_launch_numbers(opts: LaunchOptions) -> None:
    """ConfigError "[launch] KEY = value ..." for a count or time that is not a number in range."""
    for key, kind, rule in (("gpus_per_job", "int?", ">=0"), ("cpus_per_job", "int", ">=1"), ("mem_gb", "int?", ">=1"),
                            ("time_min", "int", ">=1"), ("max_parallel", "int?", ">=1"), ("wait_min", "float", ">=0")):
        check_typed(f"[launch] {key}", getattr(opts, key), kind, rule)


def _fmt(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class UnitProgress:
    """Prints 'units done / total' with elapsed time and an ETA from this session's rate."""

    def __init__(self, stage: str, total: int, already: int, stream: IO[str]):
        self.stage, self.total, self.count, self.stream = stage, total, already, stream
        self.start, self.ran = time.perf_counter(), 0

    def tick(self, name: str, ok: bool = True) -> None:
        self.count += 1
        self.ran += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.ran * (self.total - self.count)
        print(f"[{self.stage}] {self.count}/{self.total} units {'done' if ok else 'FAILED'}: {name} | "
              f"elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}", file=self.stream, flush=True)


def run_units(units: Sequence[Unit], opts: LaunchOptions, stage: str = "units", dry_run: bool = False,
              stream: IO[str] | None = None) -> list[Any] | None:
    """Run the unfinished `units` with `opts.launcher`; returns every unit's result in order.

    dry_run: print the plan (finished / to run, with output folders) and run nothing; returns None.
    Raises RuntimeError listing failed units and their logs (after every job has ended).
    """
    stream = stream or sys.stderr
    for u in units:
        problem = corrupt_outputs(u) if (Path(u.folder) / "done").is_file() else None
        if problem:
            print(f"clipmech: {problem}; unit {u.name} runs again", file=stream, flush=True)
    pending = [u for u in units if not u.done]
    print(f"[{stage}] {len(units) - len(pending)}/{len(units)} units finished, {len(pending)} to run "
          f"({opts.launcher})", file=stream, flush=True)
    if dry_run:
        for u in units:
            print(f"    {'finished' if u.done else 'to run  '}  {u.name}  -> {u.folder}", file=stream)
        return None
    progress = UnitProgress(stage, len(units), len(units) - len(pending), stream)
    failed: list[Failure] = []
    if opts.launcher == "local":
        held: list[Unit] = []
        for u in pending:
            if _run_local(u, failed, progress, stream, held):
                held.append(u)
        _wait_for_held(held, opts, failed, progress, stream)
    else:
        failed = _run_submitit(pending, opts, stage, progress)
    if failed:
        raise _failure(failed, len(pending), stage)
    return [unit_result(u) for u in units]


def _failure(failed: Sequence[Failure], pending: int, stage: str) -> Exception:
    """The error listing failed units and their logs. When every unit failed on a fault the user must
    fix (a clipmech.errors.UserError: a bad checkpoint, a missing file), it carries that exit code
    and says to fix it first; otherwise (a crash, a preempted job) rerunning is the advice."""
    lines = "\n".join(f"  {u.name}: {why}\n    log: {u.log}" for u, why, _ in failed)
    head = f"{len(failed)} of {pending} {stage} units failed:\n{lines}\n"
    codes = {err.exit_code if isinstance(err, UserError) else None for _, _, err in failed}
    if len(codes) == 1 and None not in codes:
        err = UserError(head + "Fix the cause named above, then rerun the same command (finished units are skipped).")
        err.exit_code = codes.pop()
        return err
    return RuntimeError(head + "Rerun the same command: finished units are skipped and only these are resubmitted.")


def _run_local(unit: Unit, failed: list[Failure], progress: UnitProgress, stream: IO[str],
               held: Sequence[Unit]) -> bool:
    """Run one unit here; True when another live process holds it (reported, not run)."""
    try:
        here = compute_unit(unit)
    except UnitLockedError:
        if unit not in held:
            print(f"[{progress.stage}] {unit.name}: skipped, {_holder(unit)} is computing it; "
                  "waiting for it after this process's other units", file=stream, flush=True)
        return True
    except Exception as err:  # the other units still run; all failures are reported at the end
        failed.append((unit, f"{type(err).__name__}: {err}", err))
        here = True
    progress.tick(unit.name if here else f"{unit.name} (by another process)", ok=unit.done)
    return False


def _holder(unit: Unit) -> str:
    return describe_holder(read_holder(lock_path(unit.folder, "unit")) or {})


def _wait_for_held(held: list[Unit], opts: LaunchOptions, failed: list[Failure], progress: UnitProgress,
                   stream: IO[str]) -> None:
    """Wait (polling every opts.poll_s) until the units other processes hold are done; a unit whose
    holder released it unfinished (failed) or died is run here. UnitLockedError after opts.wait_min."""
    if not held:
        return
    print(f"[{progress.stage}] waiting up to {opts.wait_min:g} min for {len(held)} units other processes are "
          f"computing ([launch] wait_min)", file=stream, flush=True)
    deadline = time.monotonic() + 60 * opts.wait_min
    while held:
        for u in list(held):
            if not _run_local(u, failed, progress, stream, held):
                held.remove(u)
        if held and time.monotonic() >= deadline:
            names = "; ".join(f"{u.name} ({_holder(u)})" for u in held)
            raise UnitLockedError(f"{len(held)} units were still being computed by other processes after "
                                  f"{opts.wait_min:g} min: {names}; rerun this command when they finish "
                                  "(finished units are reused)")
        if held:
            time.sleep(opts.poll_s)


def _run_submitit(units: Sequence[Unit], opts: LaunchOptions, stage: str, progress: UnitProgress
                  ) -> list[Failure]:
    """One submitit job array per (gpus, nodes) group of units; waits for all; returns the failures."""
    if not units:
        return []
    try:
        import submitit
    except ModuleNotFoundError as err:
        raise RuntimeError("--launcher slurm needs submitit: pip install 'clipmech[slurm]'") from err
    groups: dict[tuple[int, int], list[Unit]] = {}
    for u in units:
        gpus = u.gpus if opts.gpus_per_job is None else opts.gpus_per_job
        groups.setdefault((gpus, u.nodes), []).append(u)
    jobs = []
    for (gpus, nodes), group in groups.items():
        ex = submitit.AutoExecutor(folder=f"{opts.folder}/%j", cluster=opts.cluster or "slurm")
        params: dict[str, Any] = {"name": f"clipmech-{stage}", "timeout_min": opts.time_min, "nodes": nodes,
                                  "gpus_per_node": gpus, "cpus_per_task": opts.cpus_per_job, "tasks_per_node": 1}
        if opts.mem_gb:
            params["mem_gb"] = opts.mem_gb
        slurm = {"slurm_partition": opts.partition, "slurm_account": opts.account,
                 "slurm_array_parallelism": opts.max_parallel}
        ex.update_parameters(**params, **{k: v for k, v in slurm.items() if v is not None})
        jobs += zip(group, ex.map_array(run_unit, group))
    print(f"[{stage}] submitted {len(jobs)} jobs: {', '.join(sorted({j.job_id.split('_')[0] for _, j in jobs}))}",
          file=progress.stream, flush=True)
    failed, waiting = [], list(jobs)
    while waiting:
        time.sleep(opts.poll_s)
        for u, job in [p for p in waiting if p[1].done()]:
            waiting.remove((u, job))
            err = job.exception()
            if err is not None:
                failed.append((u, f"job {job.job_id}: {_reason(err)}", None))
            progress.tick(u.name, ok=err is None)
    return failed


def _reason(err: BaseException) -> str:
    """The last 'SomeError: message' line of a job's error (submitit wraps the remote traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt|Exit)\b.*:", ln)]
    return found[-1] if found else (lines[0] if lines and lines[0] else type(err).__name__)
