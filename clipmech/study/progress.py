"""A plain-text stage progress display with an elapsed / remaining-time estimate.

Every planned stage has a budget in seconds (its expected cost on a 2-core CPU). The remaining-time
estimate is the sum of the budgets of the stages still to run, scaled by how the stages run so far
compared with their budgets (reused stages are excluded from that ratio: they take seconds).
One line per stage start and end, so it reads the same in a terminal, a log file and CI.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Tracks planned stages {name: budget_s}; use `with progress.stage(name) as s:`."""

    def __init__(self, budgets: dict[str, float], stream: IO[str] | None = None, enabled: bool = True):
        self.budgets = dict(budgets)
        self.done: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds per stage (all threads): stable under contention
        self.reused: set[str] = set()
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled

    def remaining(self) -> float:
        """Estimated seconds left: remaining budgets x (actual / budgeted time of finished, computed stages)."""
        left = sum(b for name, b in self.budgets.items() if name not in self.done)
        ran = [n for n in self.done if n not in self.reused]
        budget_ran = sum(self.budgets[n] for n in ran)
        ratio = sum(self.done[n] for n in ran) / budget_ran if budget_ran > 0 else 1.0
        return left * min(max(ratio, 0.05), 20.0)

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator["StageHandle"]:
        """Time one planned stage; mark it reused with `handle.reused = True` inside the block."""
        if name not in self.budgets:
            raise KeyError(f"stage {name!r} was not planned; planned stages: {list(self.budgets)[:5]} ...")
        index = list(self.budgets).index(name) + 1
        handle = StageHandle()
        t0, c0 = time.perf_counter(), time.process_time()
        self._print(f"[{index:>2}/{len(self.budgets)}] {name} ...")
        yield handle
        self.done[name] = time.perf_counter() - t0
        self.cpu[name] = time.process_time() - c0
        if handle.reused:
            self.reused.add(name)
        elapsed = time.perf_counter() - self.start
        how = "reused" if handle.reused else f"{self.done[name]:.1f}s"
        self._print(f"[{index:>2}/{len(self.budgets)}] {name}: done ({how}) | elapsed {_fmt(elapsed)}, "
                    f"~{_fmt(self.remaining())} left")


    def timings(self) -> dict[str, dict[str, float | bool]]:
        """{stage: {"wall_s", "cpu_s", "reused"}} of the finished stages, in plan order."""
        return {n: {"wall_s": round(self.done[n], 2), "cpu_s": round(self.cpu[n], 2), "reused": n in self.reused}
                for n in self.budgets if n in self.done}


class StageHandle:
    """What a stage block reports back: whether its result came from the registry."""

    reused: bool = False
