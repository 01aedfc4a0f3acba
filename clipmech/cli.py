"""The `clipmech` command line.

Each area registers its own subcommands through a `register(subparsers)` function so this file
stays a table of contents; heavy imports happen inside the handlers. The area modules are plain
imports: one that fails to import fails the command, it never silently drops subcommands.
`run_guarded` is the one error boundary: an ordinary fault ends in one line on stderr and an exit
code (below), never a traceback; `--debug` (before or after the subcommand) shows the traceback instead.

Exit codes: 1 bad input (missing file, unknown name, bad value), 2 configuration or usage,
3 output folder in use by another process, 4 unusable checkpoint, 5 file system refused
(read-only, full, not a folder), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import errno
import re
import subprocess
import sys

from clipmech.analysis import cli as analysis_cli
from clipmech.data import cli as data_cli
from clipmech.eval import cli as eval_cli
from clipmech.models import cli as models_cli
from clipmech.study import cli as study_cli
from clipmech.train import cli as train_cli

# Each area's `register(subparsers)` adds its subcommands, in this order in the help.
_AREAS = [models_cli, data_cli, train_cli, eval_cli, analysis_cli, study_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipmech", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", dest="debug_all", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in _AREAS:
        area.register(sub)
    # Train, then evaluate: composed here because train/ sits below eval/ and never imports it.
    sub.choices["train"].set_defaults(after_train=eval_cli.evaluate_after_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from clipmech import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_guarded(args)


EXIT_ERROR, EXIT_CONFIG, EXIT_BUSY, EXIT_CHECKPOINT, EXIT_IO, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130

# What to do after Ctrl-C, by subcommand (default: rerun; finished parts are cached or reused).
_RESUME_HINTS = {
    "train": "rerun the same command with --resume to continue from the last saved step",
    "quickstart": "rerun the same quickstart command: finished stages are reused and an interrupted "
                  "training run continues from its last saved step",
    "experiment": "rerun the same experiment command: finished runs are skipped, interrupted ones resume",
}


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(text).strip())


def describe_error(err: BaseException, command: str | None) -> tuple[str, int] | None:
    """(one-line message, exit code) for an ordinary fault, None for anything else (a bug)."""
    from clipmech.locks import UnitLockedError
    from clipmech.train.config import ConfigError
    from clipmech.utils import CheckpointError

    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {_RESUME_HINTS.get(command or '', 'rerun the same command (finished parts are reused)')}", \
            EXIT_INTERRUPTED
    if isinstance(err, ConfigError):
        return f"config: {_one_line(err)}", EXIT_CONFIG
    if isinstance(err, UnitLockedError):
        return _one_line(err), EXIT_BUSY
    if isinstance(err, CheckpointError):
        return _one_line(err), EXIT_CHECKPOINT
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, str(err.errno))
        where = f": {err.filename}" if err.filename else ""
        text = f"{err.strerror or err}{where} ({name})"
        if err.errno in (errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT):
            text += "; free space or choose another output folder" if err.errno in (errno.ENOSPC, errno.EDQUOT) \
                else "; choose an output folder you can write"
        return text, EXIT_IO
    if isinstance(err, KeyError):
        return _one_line(err.args[0] if err.args else err), EXIT_ERROR
    if isinstance(err, subprocess.CalledProcessError):
        cmd = err.cmd if isinstance(err.cmd, str) else " ".join(map(str, err.cmd))
        return f"{cmd} failed with exit code {err.returncode} (its own message is above)", EXIT_ERROR
    if isinstance(err, (ValueError, RuntimeError, OSError)):
        return _one_line(err), EXIT_ERROR
    return None


def run_guarded(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; an ordinary fault prints one line and returns its exit code."""
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        described = describe_error(err, getattr(args, "command", None))
        if described is None or getattr(args, "debug_all", False) or getattr(args, "debug", False):
            raise
        message, code = described
        prefix = "clipmech: " if code == EXIT_INTERRUPTED else "clipmech: error: "
        print(prefix + message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
