"""Small shared helpers: atomic writes, content hashes, name suggestions, an on-disk tensor cache.

Everything that writes a file the user relies on (checkpoints, caches, manifests, results) goes
through `atomic_*` so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import difflib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from clipmech.errors import BadInputError, CheckpointError

PathLike = str | os.PathLike


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def host_tag() -> str:
    """This host's name reduced to [A-Za-z0-9_-] (part of temporary file names)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


# Temporary files of the atomic writers: `.NAME.<pid>@<host>.XXXXXXXX.tmp`; the writer's pid and host
# let clipmech.locks tell a crashed save's leftover from a save in progress.
TMP_PATTERN = r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.[A-Za-z0-9_]+\.tmp"

# Messages of torch.save's zip writer when the device fills up (it reports no errno).
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def write_failure(err: BaseException, path: PathLike) -> OSError:
    """An OSError naming `path` for a failed write; ENOSPC ("disk full") when the file system is full
    or the error says so, with the free space in the message."""
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < (1 << 20))
    if full:
        room = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return OSError(errno.ENOSPC, f"disk full ({room} on the file system of {folder})", str(path))
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror or str(err), str(path))
    return OSError(errno.EIO, f"write failed ({_first_line(err)})", str(path))


def _atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{host_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError as err:
            raise write_failure(err, path) from err
        except RuntimeError as err:
            if not any(s in str(err) for s in _TORCH_WRITE_FAILURES):
                raise
            raise write_failure(err, path) from err
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


def read_json(path: PathLike, fix: str) -> Any:
    """json.loads of a file; one that does not parse raises BadInputError naming the file, the line
    and column, and `fix` (what the user should do), instead of a bare 'Expecting value: line 8'."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); {fix}") from err
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path} is not valid JSON (not UTF-8 text at byte {err.start}); {fix}") from err


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


def state_dict_hash(state_dict: Mapping[str, Any]) -> str:
    """sha256 (hex, 16 chars) of a state dict's names, dtypes, shapes and values: equal weights give
    equal hashes whatever file they came from (torch.save's bytes also depend on the file name)."""
    h = hashlib.sha256()
    for name, value in sorted(state_dict.items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


_ZIP_MAGIC = b"PK\x03\x04"


def check_checkpoint_file(path: PathLike) -> Path:
    """Check a weight file's bytes before anything unpickles it: FileNotFoundError when missing,
    BadInputError for a folder, CheckpointError (exit 4) when empty, not a PyTorch / safetensors
    file, or truncated. Returns the path. Cost: reads the file's first bytes (and a zip's index)."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".safetensors"))
        raise BadInputError(f"{path} is a folder, not a weight file; pass one file inside it"
                            + (f" ({', '.join(found[:5])})" if found else " (it holds no .pt / .bin / .safetensors file)"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its save was interrupted; delete it and "
                              "rerun the step that writes it (train --resume recreates checkpoints)")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if path.suffix == ".safetensors":
        header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if header < 2 or head[8:9] != b"{" or 8 + header > size:
            raise CheckpointError(f"{path} is not a complete safetensors file ({size} bytes; its header "
                                  "does not fit): copy it again or check the path")
        return path
    if head[:4] != _ZIP_MAGIC and not head.startswith(b"\x80"):  # torch zip format / legacy pickle protocol 2+
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with bytes {head[:4].hex()}, "
                              "not a torch.save file); check the path")
    if head[:4] == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes, its end is missing): a save or a "
                              "copy did not finish; copy it again or rerun the step that writes it")
    return path


def read_checkpoint(path: PathLike, trusted: bool = False) -> Any:
    """torch.load(path) on CPU with one named cause per failure (CheckpointError): missing, empty,
    not a PyTorch checkpoint, truncated (`check_checkpoint_file`), or holding Python objects besides
    tensors (only when `trusted` is False: weights_only loading refuses them)."""
    import zipfile

    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if not trusted and "Weights only load failed" in str(err):
            raise CheckpointError(f"{path} holds Python objects besides tensors (optimizer / RNG state?); load "
                                  "an epoch_N.pt file instead, or pass trusted=True if you trust its source") from err
        raise CheckpointError(f"checkpoint {path} is corrupt ({_first_line(err)})") from err
    except (RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


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


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """DeprecationWarning that `old` (an argument, value or function) is now `new`; old names keep
    working for one release."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def save_figure(fig: Any, path: PathLike, dpi: int = 130) -> Path:
    """Write a matplotlib Figure as PNG to `path` atomically (tight bounding box). Works on a
    `matplotlib.figure.Figure` built without pyplot, so no backend is chosen or changed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(buf.getvalue(), path)
