"""An idempotent unit of work: a picklable call whose JSON result lives in its own folder.

`Unit.folder` is chosen by the caller from a content hash of everything the result depends on, so a
changed input gets a new folder and a finished one is never recomputed. `run_unit` writes, in that
folder, `log.txt` (the unit's stdout/stderr, appended per attempt), `result.json` and, last, the
`done` marker; a unit killed half-way has no `done` and runs again from the start.

One writer per unit: `run_unit` holds the unit's lock (clipmech.locks, `.clipmech-unit.lock` in its
folder) while it computes, so two processes on one output never compute the same unit; the second
is refused with UnitLockedError and the launcher waits for the first. A finished unit whose
`result.json` or `done` no longer parses (a bad copy, a disk fault) counts as unfinished and runs
again (`corrupt_outputs` names the file and the parse error).
"""
from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clipmech.locks import unit_lock
from clipmech.utils import atomic_write_json, atomic_write_text, read_json


@dataclass(frozen=True)
class Unit:
    """One unit: `fn(*args)` (a module-level function, so it pickles for submitit) -> JSON-able result.

    name: a short human label ("run-a/cka"); folder: where its outputs go (content-hashed by the
    caller); gpus: GPUs the unit wants when launched as a job (0: CPU only); nodes: nodes per job.
    """

    name: str
    folder: str
    fn: Callable[..., Any]
    args: tuple = ()
    gpus: int = 0
    nodes: int = 1
    info: dict = field(default_factory=dict, compare=False)

    @property
    def done(self) -> bool:
        """Whether the unit finished: its `done` marker and result exist and parse (reads both)."""
        f = Path(self.folder)
        return (f / "done").is_file() and (f / "result.json").is_file() and corrupt_outputs(self) is None

    @property
    def log(self) -> Path:
        return Path(self.folder) / "log.txt"


def corrupt_outputs(unit: Unit) -> str | None:
    """'FILE is not valid JSON (parse error)' when the unit's done marker or result.json exists but
    does not parse (or the marker is not an object), else None (also when they are missing)."""
    for name in ("done", "result.json"):
        path = Path(unit.folder) / name
        try:
            value = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            return f"{path} is not valid JSON ({err})"
        if name == "done" and not isinstance(value, dict):
            return f"{path} is not a done marker (a JSON object)"
    return None


def unit_result(unit: Unit) -> Any:
    """The stored result of a finished unit; FileNotFoundError naming the unit otherwise."""
    if not unit.done:
        raise FileNotFoundError(f"unit {unit.name} has not finished (no {Path(unit.folder) / 'done'}); "
                                f"see its log {unit.log}")
    return read_json(Path(unit.folder) / "result.json", "rerun the same command: the unit runs again")


def run_unit(unit: Unit) -> Any:
    """Run `unit` unless finished; returns its result. Output is appended to the unit's log.txt.

    The `done` marker is written after the result, both atomically, so an interrupted unit reruns.
    The unit's lock is held while it runs: UnitLockedError (naming the holder) when another live
    process runs it; a unit finished by another process while this one waited is not rerun.
    Exceptions propagate after their traceback is written to the log.
    """
    compute_unit(unit)
    return unit_result(unit)


def compute_unit(unit: Unit) -> bool:
    """Compute `unit` here unless it is finished; True when this call computed it, False when it was
    finished (by another process, possibly while this one took the lock). UnitLockedError when
    another live process holds it."""
    if unit.done:
        return False
    with unit_lock(unit.folder, "unit"):
        if unit.done:  # finished by another process between the check above and the lock
            return False
        _compute(unit)
        return True


def _compute(unit: Unit) -> Any:
    """Run the unit (its lock held), log to log.txt, write result.json then the done marker."""
    folder = Path(unit.folder)
    (folder / "done").unlink(missing_ok=True)  # a corrupt marker: the unit is unfinished until rewritten
    t0 = time.time()
    with open(unit.log, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"== {unit.name}: start {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        try:
            result = unit.fn(*unit.args)
        except BaseException:
            traceback.print_exc(file=log)
            raise
        seconds = time.time() - t0
        print(f"== {unit.name}: done in {seconds:.1f}s", flush=True)
    atomic_write_json(result, folder / "result.json")
    atomic_write_text(json.dumps({"seconds": round(seconds, 3), "finished": time.time()}) + "\n", folder / "done")
    return result


def unit_seconds(unit: Unit) -> float | None:
    """Wall seconds the finished unit took (from its `done` marker), None if unfinished."""
    if not unit.done:
        return None
    return float(json.loads((Path(unit.folder) / "done").read_text()).get("seconds", 0.0))
