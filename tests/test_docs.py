"""The README and docs/ as a newcomer reads them: every Python snippet runs as written, every local
link resolves, and the README stays a front page (<= 200 lines of <= 120 characters).

A snippet that needs downloaded weights is preceded by the marker `<!-- not run: REASON -->`; those are
counted and listed, never silently dropped, and each names the test that runs its local-file form.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# docs/api.md is one session read in order; tests/test_docs_api.py runs it that way and checks its claims
IN_ORDER = {ROOT / "docs" / "api.md"}
FENCE = re.compile(r"(<!-- not run: (?P<why>[^>]*) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def snippets() -> list[tuple[str, str, str | None]]:
    """(id, code, reason-not-run) for every ```python block of the README and docs/."""
    out = []
    for path in DOCS:
        if path in IN_ORDER:
            continue
        for i, m in enumerate(FENCE.finditer(path.read_text())):
            out.append((f"{path.relative_to(ROOT)}#{i}", m["code"], m["why"]))
    return out


RUN = [(name, code) for name, code, why in snippets() if why is None]


def test_the_walk_sees_the_snippets():
    assert len(RUN) >= 8, [n for n, _ in RUN]
    skipped = [(n, why) for n, _, why in snippets() if why is not None]
    for name, why in skipped:  # each names where its local-file form is tested
        assert "test_" in why, f"{name}: a not-run snippet must name the test that runs its local form"


@pytest.mark.parametrize("name,code", RUN, ids=[n for n, _ in RUN])
def test_snippet_runs_as_written(name, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{name} failed:\n{code}\n--- stderr ---\n{res.stderr[-3000:]}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_local_links_resolve():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken
