"""Where a results file came from: the `provenance` block of results.json (docs/results_schema.md).

Enough to say whether two result files can be compared and to rerun one: the code (clipmech version
and git commit of the checkout it was imported from, when it is one), the numerical libraries, the
data (the dataset's content fingerprint), and the machine settings that change floating-point results
(torch threads, device).
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD of the git checkout holding `path` (default: this package), with "-dirty" when tracked files
    differ from it; None outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(dataset=None, device: str = "cpu") -> dict[str, Any]:
    """The provenance block: {"clipmech", "git_commit", "python", "torch", "open_clip", "numpy",
    "dataset": {"name", "fingerprint"} or None, "torch_threads", "device"}. Cost: two git calls."""
    import numpy
    import open_clip
    import torch

    from clipmech import __version__
    return {"clipmech": __version__, "git_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": numpy.__version__,
            "dataset": None if dataset is None else {"name": dataset.name, "fingerprint": dataset.content_hash()},
            "torch_threads": torch.get_num_threads(), "device": device}
