"""The package's import structure: dependencies point one way (core <- catalog/cache/kernels <- ...), no cycles in core.

Read from the source with ``ast`` (every import, also those inside functions), so a
lazy import cannot hide a wrong-way dependency.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "attnzoo"


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """``module -> attnzoo modules it imports`` for every module of the package."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    names = [f"{target}.{a.name}" for a in node.names] if not node.module else []
                else:
                    target, names = node.module or "", []
                targets.update(n for n in [target, *names] if n.startswith("attnzoo"))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("attnzoo"))
    modules = set(graph)
    # ``from . import evict`` names a module; ``from .x import name`` names x (drop what is not a module)
    return {m: {t for t in ts if t in modules and t != m} for m, ts in graph.items()}


def _area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_core_modules_form_no_cycle():
    graph = {m: {t for t in ts if t.startswith("attnzoo.core.")} for m, ts in _imports().items()
             if m.startswith("attnzoo.core.")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError(f"import cycle in core: {' -> '.join(path[path.index(m):] + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("area, allowed", [
    ("core", {"core", "errors"}),
    ("cache", {"cache", "core", "kernels", "checks", "registry", "errors"}),  # never the catalog: a peer
    ("kernels", {"kernels", "core", "errors"}),
])
def test_dependencies_point_one_way(area, allowed):
    wrong = sorted(f"{m} imports {t}" for m, ts in _imports().items() if _area(m) == area
                   for t in ts if _area(t) not in allowed)
    assert not wrong, "\n".join(wrong)


def test_each_core_module_imports_on_its_own():
    """Each core module imported first in a clean package state: none needs another to be imported before it."""
    mods = sorted(m for m in _imports() if m.startswith("attnzoo.core."))
    code = ("import importlib, sys, torch\n"
            "for m in sys.argv[1:]:\n"
            "    for name in [n for n in sys.modules if n.startswith('attnzoo')]:\n"
            "        del sys.modules[name]\n"
            "    importlib.import_module(m)\n")
    subprocess.run([sys.executable, "-c", code, *mods], check=True, timeout=300)
    assert importlib.import_module("attnzoo.core.blocksparse").BlockLayout is \
        importlib.import_module("attnzoo.core.layout").BlockLayout
