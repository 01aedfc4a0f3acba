"""Registry of finished study stages, keyed by a hash of everything that determines their result.

A stage (one training run, one model's evaluation, one analysis) is identified by its name and a
JSON-able key (the config, upstream checkpoint hashes, dataset content hash, code schema version).
`Registry.run(stage, key, fn)` returns the stored result when `root/<stage>/<hash(key)>.json`
exists and calls `fn()` otherwise, storing its JSON-able result atomically. A rerun of the
quickstart or of an experiment therefore skips finished work, and a changed input (new
checkpoint, new option) changes the key and recomputes only what depends on it.

Our own code: the few lines here are simpler than adopting a workflow engine, and the keys follow
clipmech.utils.hash_obj like the TensorCache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from clipmech.utils import PathLike, atomic_write_json, hash_obj


class Registry:
    """Finished stages under `root`: one JSON file {"stage", "key", "result"} per (stage, key)."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: Any) -> Path:
        """Where the result of `stage` for `key` lives (whether or not it exists yet)."""
        if not stage or "/" in stage or stage.startswith("."):
            raise ValueError(f"stage name {stage!r} must be a non-empty plain name without '/'")
        return self.root / stage / f"{hash_obj(key)}.json"

    def get(self, stage: str, key: Any) -> Any | None:
        """The stored result, or None when the stage has not finished for this key.

        An unreadable entry (e.g. written by a crashed older version) counts as not finished.
        """
        p = self.path(stage, key)
        if not p.exists():
            return None
        try:
            entry = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return entry.get("result")

    def put(self, stage: str, key: Any, result: Any) -> Any:
        """Store a JSON-able `result` for (stage, key) atomically; returns it."""
        if result is None:
            raise ValueError(f"stage {stage!r} returned None; a finished stage must record a result")
        atomic_write_json({"stage": stage, "key": key, "result": result}, self.path(stage, key))
        return result

    def run(self, stage: str, key: Any, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """(result, reused): the stored result if finished, else `fn()` stored and returned."""
        found = self.get(stage, key)
        if found is not None:
            return found, True
        return self.put(stage, key, fn()), False

    def finished(self, stage: str) -> list[dict[str, Any]]:
        """Every stored {"stage", "key", "result"} entry of `stage` (for redrawing figures)."""
        folder = self.root / stage
        entries = []
        for p in sorted(folder.glob("*.json")) if folder.exists() else []:
            try:
                entries.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return entries
