"""The `clipmech` command line.

Each area registers its own subcommands through a `register(subparsers)` function so this file
stays a table of contents; heavy imports happen inside the handlers, and the packages re-export
lazily, so `import clipmech.cli` and `clipmech --help` load no torch (0.07-0.10 s instead of 3.0-3.6 s; a test
checks). The area modules are plain imports: one that fails to import fails the command, it never
silently drops subcommands.
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
from clipmech.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_IO, UserError
from clipmech.eval import cli as eval_cli
from clipmech.models import cli as models_cli
from clipmech.study import cli as study_cli
from clipmech.train import cli as train_cli
from clipmech.view import cli as view_cli

# Each area's `register(subparsers)` adds its subcommands, in this order in the help.
_AREAS = [models_cli, data_cli, train_cli, eval_cli, analysis_cli, study_cli, view_cli]


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


# What to do after Ctrl-C, by subcommand (default: rerun; finished parts are cached or reused).
_RESUME_HINTS = {
    "train": "rerun the same command with --resume to continue from the last saved step",
    "quickstart": "rerun the same quickstart command: finished stages are reused and an interrupted "
                  "training run continues from its last saved step",
    "interpolation": "rerun the same interpolation command: finished models and stages are reused",
    "experiment": "rerun the same experiment command: finished runs are skipped, interrupted ones resume",
}


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(text).strip())


def describe_error(err: BaseException, command: str | None) -> tuple[str, int] | None:
    """(one-line message, exit code) for an ordinary fault, None for anything else (a bug).

    A clipmech.errors.UserError carries its own code; standard exceptions are mapped: OSError with
    an errno -> 5 (file system), other OSError / ValueError / RuntimeError / KeyError -> 1."""
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {_RESUME_HINTS.get(command or '', 'rerun the same command (finished parts are reused)')}", \
            EXIT_INTERRUPTED
    if isinstance(err, UserError) and not (isinstance(err, OSError) and err.errno is not None):
        return err.label + _one_line(err), err.exit_code
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


# Ranges of `clipmech analyze` options, checked before any model is loaded (exit 2 naming the flag);
# min_rows also depends on --estimator (the unbiased CKA needs 4 rows).
_ANALYZE_RANGES = {"batch_size": ("int", ">=1"), "sae_batch_size": ("int", ">=1"), "n_boot": ("int", ">=0"),
                   "n_perm": ("int", ">=0"), "per_domain": ("int", ">=1"), "expansion": ("int", ">=1"),
                   "k": ("int?", ">=1"), "lr": ("float", ">0"), "epochs": ("int", ">=1"), "top": ("int", ">=1"),
                   "n_images": ("int", ">=1"), "steps": ("int", ">=1"), "node_fraction": ("float", "0..1"),
                   "top_k": ("int", ">=1"), "n_draws": ("int", ">=1"), "n_strata": ("int", ">=1"),
                   "checkpoint": ("int?", ">=0"), "seed": ("int", ">=0")}


def check_analyze_options(args: argparse.Namespace) -> None:
    """ConfigError for an `analyze` option out of range or a --device this machine lacks."""
    from clipmech.checks import check_device, check_typed
    ranges = _ANALYZE_RANGES | {"min_rows": ("int?", ">=4" if getattr(args, "estimator", "unbiased") == "unbiased"
                                             else ">=2")}
    for dest, (kind, rule) in ranges.items():
        if getattr(args, dest, None) is not None:
            check_typed("--" + dest.replace("_", "-"), getattr(args, dest), kind, rule)
    if getattr(args, "device", None) is not None:
        check_device("--device", args.device)


def run_guarded(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; an ordinary fault prints one line and returns its exit code."""
    try:
        if getattr(args, "command", None) == "analyze":
            check_analyze_options(args)
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
