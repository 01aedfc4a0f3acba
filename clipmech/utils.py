"""Small shared helpers: atomic writes, content hashes, name suggestions, an on-disk tensor cache.

Everything that writes a file the user relies on (checkpoints, caches, manifests, results) goes
through `atomic_*` so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

PathLike = str | os.PathLike


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return _atomic(path, write)


def atomic_write_text(text: str, path: PathLike) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: PathLike, indent: int = 2) -> Path:
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n", path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):  # numpy arrays and scalars
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def hash_obj(obj: Any) -> str:
    """Stable sha256 (hex, 16 chars) of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: PathLike, chunk: int = 1 << 20) -> str:
    """sha256 (hex, 16 chars) of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def closest_names(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The `n` valid names most similar to `name` (for 'did you mean' errors)."""
    valid = list(valid)
    found = difflib.get_close_matches(name, valid, n=n, cutoff=0.0)
    return found[:n]


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> KeyError:
    """A KeyError naming `name` and the 3 closest valid names."""
    near = ", ".join(repr(v) for v in closest_names(name, valid))
    return KeyError(f"unknown {kind} {name!r}; closest valid names: {near}")


class TensorCache:
    """Content-addressed on-disk cache of tensors / dicts of tensors.

    `get_or_compute(key, fn)` hashes the JSON-able `key` (include checkpoint file hashes, dataset
    content hashes, transform descriptions: anything that changes the result), loads
    `root/<hash>.pt` if present, else calls `fn()` and writes the result atomically.
    """

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def path(self, key: Any) -> Path:
        return self.root / f"{hash_obj(key)}.pt"

    def get_or_compute(self, key: Any, fn: Callable[[], Any]) -> Any:
        """The cached value for `key`, else `fn()` (stored). An entry that cannot be read (truncated,
        overwritten) is reported with a RuntimeWarning naming the file, then recomputed."""
        p = self.path(key)
        if p.exists():
            try:
                return torch.load(p, map_location="cpu", weights_only=False)
            except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
                warnings.warn(f"cache entry {p} is unreadable ({type(err).__name__}: {str(err)[:120]}); "
                              "recomputing it", RuntimeWarning, stacklevel=2)
                p.unlink(missing_ok=True)
        value = fn()
        atomic_torch_save(value, p)
        atomic_write_json(key, p.with_suffix(".json"))
        return value
