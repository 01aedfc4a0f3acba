"""`clipmech view DIR`: a study folder as a static site that opens offline from file://."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `clipmech view` to the `clipmech` parser."""
    p = subparsers.add_parser(
        "view", help="write a browsable static site of a study: findings, models, circuits, nodes",
        description="Read DIR (a `clipmech quickstart` or `clipmech experiment analyse` output folder, or one "
                    "run's analysis folder RUN_DIR/analysis) and write DIR/view/index.html with its assets and "
                    "per-page data. The site needs no server and no network: open index.html from disk. It reads "
                    "the study's files and computes nothing; a rerun replaces the site whole.")
    p.add_argument("dir", metavar="DIR", help="study folder holding results.json, or a run's analysis folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_view)


def _view(args: argparse.Namespace) -> int:
    from clipmech.view.site import build_site
    site = build_site(args.dir)
    print(f"wrote {site.index} ({site.models} model pages, {site.circuits} circuits, "
          f"{site.explained_models} models with explanations; {site.bytes / 1e6:.1f} MB) in {site.seconds:.1f} s; "
          "open it in a browser, no server needed")
    return 0
