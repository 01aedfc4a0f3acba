"""The package's import graph has no circle, and every third-party module that clipmech/ or tests/
import is declared in pyproject.toml (so a fresh `pip install -e .[dev]` runs the suite)."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "clipmech"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """(module, imported attribute or None) for every import statement at any depth (function-level
    imports count: a circle through them still ties the two modules together)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            found += [(base, a.name) for a in node.names]
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (edges to a package mean its __init__)."""
    files = {_module_name(p, package_dir.parent): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges = set()
        for target, attr in _imported_names(ast.parse(path.read_text(encoding="utf-8")), mod,
                                            path.name == "__init__.py"):
            if attr is not None and f"{target}.{attr}" in files:
                edges.add(f"{target}.{attr}")
                continue
            while target and target not in files:  # `import a.b.c` of a non-module attribute path
                target = target.rpartition(".")[0]
            if target:
                edges.add(target)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [a, b, ..., a] if the graph has any, else None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_finds_a_circle_and_accepts_a_dag(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import thing\n")  # function-level, relative
    (pkg / "c.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_package_import_graph_has_no_circle():
    graph = import_graph(ROOT / PACKAGE)
    assert len(graph) > 40  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# Data flows one way: each area imports only areas below it.
LAYERS = ("data", "models", "train", "eval", "analysis", "study", "view", "cli")
BASE = ("launch", "locks", "utils", "errors", "checks")  # below every area; import no area


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a higher area from a lower one, or of an area from a base module.
    The package root (`clipmech/__init__`: the version and a convenience re-export) is exempt both ways."""
    def area(mod: str) -> str:
        return mod.split(".")[1] if "." in mod else ""

    bad = []
    for mod, edges in sorted(graph.items()):
        a = area(mod)
        for target in sorted(edges):
            b = area(target)
            if not a or not b or a == b or b in BASE:
                continue
            if a in BASE or LAYERS.index(b) > LAYERS.index(a):
                bad.append(f"{mod} -> {target}")
    return bad


def test_layering_finder_flags_an_upward_import(tmp_path):
    pkg = tmp_path / "clipmech"
    for area in ("data", "eval", "locks"):
        (pkg / area).mkdir(parents=True)
        (pkg / area / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from clipmech.eval import x\n")  # the root is exempt
    (pkg / "eval" / "a.py").write_text("from clipmech.data import d\nfrom clipmech.locks import l\n")
    assert layer_violations(import_graph(pkg)) == []
    (pkg / "data" / "b.py").write_text("def f():\n    from clipmech.eval import a\n")
    (pkg / "locks" / "c.py").write_text("import clipmech.data\n")
    assert layer_violations(import_graph(pkg)) == ["clipmech.data.b -> clipmech.eval.a",
                                                   "clipmech.locks.c -> clipmech.data"]


def test_package_imports_follow_the_layering():
    """data -> models -> train -> eval -> analysis -> study -> view -> cli, launch / locks / utils below
    all: e.g. the trainer never calls the evaluator (the CLI composes "train, then evaluate")."""
    bad = layer_violations(import_graph(ROOT / PACKAGE))
    assert not bad, "imports against the layering: " + "; ".join(bad)


def test_the_command_line_imports_no_torch_until_a_command_needs_it():
    """`import clipmech.cli` and `clipmech --help` stay light: the packages re-export lazily (PEP 562),
    and every re-export still resolves to the object of its module."""
    code = ("import sys, clipmech.cli; heavy = sorted({'torch', 'open_clip', 'transformer_lens'} & set(sys.modules)); "
            "print(heavy); import clipmech.data as d, clipmech.eval as e, clipmech.train as t; "
            "from clipmech.data.mixtures import build_mixture; from clipmech.eval.zeroshot import zero_shot; "
            "from clipmech.train.trainer import train; "
            "assert (d.build_mixture, e.zero_shot, t.train) == (build_mixture, zero_shot, train); "
            "assert all(getattr(m, n) is not None for m in (d, e, t) for n in m.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "[]"
    helped = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['clipmech', '--help']\n"
                             "import clipmech.cli\ntry:\n    clipmech.cli.main()\nexcept SystemExit as e:\n"
                             "    assert e.code == 0, e.code\nprint('torch' in sys.modules)"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert helped.returncode == 0 and helped.stdout.strip().endswith("False"), helped.stdout[-500:] + helped.stderr[-2000:]
    import clipmech.data as d
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        d.nope  # noqa: B018


# ------------------------------------------------------------------------------- declared imports
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0])


def _guarded_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside `try: ... except ImportError` or a `sys.version_info` branch."""
    guarded = set()
    for node in ast.walk(tree):
        catches_import = isinstance(node, ast.Try) and any(
            h.type is not None and any(n in ast.unparse(h.type) for n in ("ImportError", "ModuleNotFoundError"))
            for h in node.handlers)
        if catches_import or (isinstance(node, ast.If) and "version_info" in ast.unparse(node.test)):
            guarded |= {id(sub) for sub in ast.walk(node)}
    return guarded


def third_party_imports(files: list[Path], local: set[str]) -> dict[str, tuple[bool, set[str]]]:
    """top-level import name -> (imported unguarded anywhere, files), stdlib and local names left out.
    `pytest.importorskip("x")` counts as a guarded import of x."""
    found: dict[str, tuple[bool, set[str]]] = {}

    def add(name: str, hard: bool, f: Path) -> None:
        top = name.split(".")[0]
        if not top or top in sys.stdlib_module_names or top in local or top == "__future__":
            return
        was_hard, where = found.get(top, (False, set()))
        found[top] = (was_hard or hard, where | {str(f.relative_to(ROOT))})

    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        guarded = _guarded_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, id(node) not in guarded, f)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                add(node.module, id(node) not in guarded, f)
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                add(str(node.args[0].value), False, f)
    return found


def test_every_imported_module_is_declared_in_pyproject():
    """Unguarded imports: a runtime dependency or the `dev` extra (what the README installs) declares
    the distribution itself (a dependency's dependency may disappear in its next release). Guarded
    imports (optional integrations): declared in some extra."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {e: {_req_name(r) for r in reqs} for e, reqs in meta["optional-dependencies"].items()}
    installed = {_req_name(r) for r in meta["dependencies"]} | extras["dev"]
    any_extra = set().union(*extras.values())
    owners = {mod: {_norm(d) for d in dists} for mod, dists in md.packages_distributions().items()}
    files = sorted((ROOT / PACKAGE).rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    local = {PACKAGE} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    imports = third_party_imports(files, local)
    assert {"torch", "open_clip", "pytest"} <= set(imports)  # the walk saw the code
    problems = []
    for name, (hard, where) in sorted(imports.items()):
        dists = owners.get(name, set()) | {_norm(name)}  # not installed here: the name itself
        allowed = installed if hard else any_extra | installed
        if not dists & allowed:
            kind = "imported" if hard else "optionally imported"
            problems.append(f"{name} ({kind} by {', '.join(sorted(where)[:3])}; distribution "
                            f"{', '.join(sorted(owners.get(name, {'unknown'})))})")
    assert not problems, "undeclared in pyproject.toml: " + "; ".join(problems)
