"""The package's layers, from the source alone: module top levels form no import cycle, and the core imports nothing
above it (only :mod:`structmat.checks`). Imports inside functions are allowed to go upward (the operator algebra of
``LinearOperator`` builds combinators lazily)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import structmat

ROOT = pathlib.Path(structmat.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("structmat", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _top_level_imports(name: str) -> set[str]:
    """The structmat modules that ``name`` imports when it is first imported (statements outside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("structmat.") or a.name == "structmat")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not (target == "structmat" or target.startswith("structmat.")):
                    continue
                for alias in node.names:  # `from pkg import module` depends on the module itself
                    sub = f"{target}.{alias.name}"
                    out.add(sub if sub in MODULES else target)

    visit(ast.parse(path.read_text()).body)
    out.discard(name)
    return out


GRAPH = {name: _top_level_imports(name) for name in MODULES}


def test_graph_sees_the_imports():
    assert "structmat.core.base" in GRAPH["structmat.operators.dense"]
    assert "structmat.core.nodes" in GRAPH["structmat.combinators"]
    assert "structmat.checks" in GRAPH["structmat.core.base"]


def test_no_top_level_import_cycle():
    # Every structmat module depends, at import time, on the package __init__ of its parents; those edges are not
    # cycles in the sense that matters (a package imports its modules), so they are left out here.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if name.startswith(dep + ".") or dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name, [name])
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_nothing_above_it():
    allowed = ("structmat.core", "structmat.checks")
    bad = {
        name: sorted(dep for dep in deps if not dep.startswith(allowed) and not name.startswith(dep + "."))
        for name, deps in GRAPH.items()
        if name.startswith("structmat.core")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_checks_is_a_leaf():
    assert GRAPH["structmat.checks"] == set()


def test_every_module_imports_first():
    # Each module imported first, with no structmat module loaded before (torch stays loaded: one interpreter): an
    # order-dependent import (a cycle that only works from one side) fails here.
    code = (
        "import importlib, sys, torch\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'structmat' or m.startswith('structmat.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        sys.exit(f'importing {name} first: {type(exc).__name__}: {exc}')\n"
    )
    names = sorted(name for name in MODULES if not name.endswith("__main__"))
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
