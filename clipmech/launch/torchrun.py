"""Training units: the torchrun command of one run, and running it with its output in the unit log.

Multi-node: with nnodes > 1 the command uses torchrun's c10d rendezvous; the endpoint comes from
[launch] rdzv_endpoint or, inside a SLURM job, the job's first host (port 29500).
"""
from __future__ import annotations

import subprocess
import sys
from typing import Mapping


def torchrun_command(config_path: str, run_dir: str, nproc: int, nnodes: int = 1,
                     rdzv: Mapping[str, str] | None = None) -> list[str]:
    """The torchrun command training one run (resumes from latest.pt when the run was interrupted).

    rdzv: {"rdzv_endpoint", "rdzv_backend", "rdzv_id"} passed through when nnodes > 1."""
    cmd = ["torchrun", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        rdzv = dict(rdzv or {})
        cmd += [f"--rdzv-backend={rdzv.get('rdzv_backend') or 'c10d'}",
                f"--rdzv-endpoint={rdzv.get('rdzv_endpoint') or '$MASTER'}",
                f"--rdzv-id={rdzv.get('rdzv_id') or 'clipmech'}"]
    return cmd + ["-m", "clipmech.cli", "train", "--config", str(config_path), "--out", str(run_dir), "--resume"]


def run_command(cmd: list[str]) -> dict[str, object]:
    """Run `cmd`, copying its output into this process's stdout (the unit log); raise on failure.

    A "$MASTER" rendezvous endpoint is replaced by the SLURM job's first host (submitit's job
    environment) so every node of a multi-node job meets at the same place."""
    if any("$MASTER" in c for c in cmd):
        import submitit
        host = submitit.JobEnvironment().hostnames[0]
        cmd = [c.replace("$MASTER", f"{host}:29500") for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        sys.stdout.write(line)
    if proc.wait() != 0:
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return {"command": cmd}
