"""One writer per unit of work: lock files, stale-lock detection and stale temporary files.

A unit (a training run folder, a run's evaluation, one analysis of a run, a quickstart folder) is
guarded by `FOLDER/.clipmech-<unit>.lock`, created with O_CREAT | O_EXCL so exactly one process can
hold it, even on network file systems that honour exclusive create. The file holds the holder's
host, pid, command and start time, so a refused second writer is told who holds the unit. A lock
left by a process of this host that no longer runs (killed, power loss) is stale: it is reported
and taken over. Locks from other hosts cannot be checked and are never taken over.

Creating the lock is also the up-front proof that the output folder can be written: a read-only
folder or a file in the way fails here, before any work, with the OSError naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from clipmech.errors import UnitBusyError
from clipmech.utils import TMP_PATTERN, PathLike, host_tag


class UnitLockedError(UnitBusyError):
    """Another live process holds the unit's lock (the message names it); exit code 3."""


def lock_path(folder: PathLike, unit: str) -> Path:
    """Where the lock of `unit` in `folder` lives."""
    return Path(folder) / f".clipmech-{unit}.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with `pid` runs on this host (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_holder(path: PathLike) -> dict | None:
    """The holder record of a lock file, {} when unreadable (being written), None when absent."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """'pid 123 on host h (clipmech train ...) since 12:00:01 UTC' for messages."""
    if not info:
        return "another process (its lock record is still being written)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} ({info.get('command', '?')}) since {since}"


def is_stale(info: dict | None) -> bool:
    """A lock of this host whose process is gone. Unknown holders and other hosts are live."""
    if not info or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid)


def _create(path: Path, record: dict) -> bool:
    """Create the lock file exclusively; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def ensure_folder(folder: PathLike) -> Path:
    """Create `folder` and its parents; NotADirectoryError naming a file that stands in the way."""
    folder = Path(folder)
    for p in [folder, *folder.parents]:
        if p.exists():
            if not p.is_dir():
                what = "output folder is a file" if p == folder else f"a file is in the way of output folder {folder}"
                raise NotADirectoryError(errno.ENOTDIR, what, str(p))
            break
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def acquire(folder: PathLike, unit: str, command: str | None = None) -> Path:
    """Create `folder` if needed and take the lock of `unit` in it; returns the lock path.

    Raises UnitLockedError naming the holder when a live process holds it, OSError when the folder
    cannot be created or written. A stale lock (dead process of this host) is reported on stderr
    and replaced. Cost: a few small file operations.
    """
    folder = ensure_folder(folder)
    path = lock_path(folder, unit)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "command": command or " ".join(["clipmech", *sys.argv[1:]])[:300]}
    for _ in range(3):
        if _create(path, record):
            return path
        info = read_holder(path)
        if info is None:  # released between our attempt and the read
            continue
        if not is_stale(info):
            raise UnitLockedError(f"{folder} is in use ({unit}) by {describe_holder(info)}; wait for it to "
                                  f"finish or choose another output folder (if that process is gone, delete {path})")
        print(f"clipmech: removing the stale lock {path} of {describe_holder(info)}, which no longer runs",
              file=sys.stderr)
        path.unlink(missing_ok=True)
    raise UnitLockedError(f"could not take the lock {path}: other processes keep creating it")


def release(path: PathLike) -> None:
    """Remove a lock taken by this process (a lock of another holder is left alone)."""
    info = read_holder(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def unit_lock(folder: PathLike, unit: str, command: str | None = None, clean_tmp: bool = True,
              recursive: bool = False) -> Iterator[Path]:
    """Hold the lock of `unit` in `folder` for the block; first removes stale temporary files there.
    A folder this call created is removed again when the block leaves it empty (a run that failed
    before writing anything leaves nothing behind)."""
    created = not Path(folder).exists()
    try:
        path = acquire(folder, unit, command)
        try:
            if clean_tmp:
                remove_stale_tmp(folder, recursive=recursive)
            yield path
        finally:
            release(path)
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty (or never made): keep it
                Path(folder).rmdir()


def remove_stale_tmp(folder: PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of clipmech's atomic writers under `folder` whose writer is gone.

    The writers name temporaries `.NAME.<pid>@<host>.XXXX.tmp`; a file of this host whose pid no
    longer runs is stale (a crashed save). Files of other hosts or live writers are kept. Returns
    the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob if recursive else folder.glob)(".*.tmp"):
        m = re.fullmatch(TMP_PATTERN, p.name)
        if m is None or not p.is_file():
            continue
        if m["host"] == host_tag() and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
