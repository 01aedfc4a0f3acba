"""The `clipmech` command line.

Each area registers its own subcommands through a `register(subparsers)` function so this file
stays a table of contents; heavy imports happen inside the handlers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, attribute) pairs whose `register(subparsers)` adds subcommands. A module that does not
# exist yet is skipped so partially built trees still run.
_AREAS = [
    "clipmech.models.cli",
    "clipmech.data.cli",
    "clipmech.train.cli",
    "clipmech.eval.cli",
    "clipmech.analysis.cli",
    "clipmech.study.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipmech", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _AREAS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue
            raise
        mod.register(sub)
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
