"""The `clipmech` command line.

Each area registers its own subcommands through a `register(subparsers)` function so this file
stays a table of contents; heavy imports happen inside the handlers. The area modules are plain
imports: one that fails to import fails the command, it never silently drops subcommands.
"""
from __future__ import annotations

import argparse
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in _AREAS:
        area.register(sub)
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
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"clipmech: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
