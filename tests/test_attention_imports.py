"""The layout of structmat_attention: no import cycle among its modules' top levels, every public name importable
from where it was before the package was split by concern (levels, paths, functional, layers, variants)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import structmat_attention

PACKAGE = Path(structmat_attention.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def _top_level_imports(path: Path) -> set[str]:
    """The structmat_attention modules that ``path`` imports when it is imported (statements at its top level)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from . import x``: the submodule x when there is one, else a name of the package itself
            targets = [f"{source}.{a.name}" if _is_module(f"{source}.{a.name}") else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "structmat_attention" and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _top_level_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_import_graph_is_read():
    graph = _graph()
    assert {"structmat_attention.levels", "structmat_attention._pieces"} <= graph["structmat_attention.functional"]
    assert "structmat_attention.layers" in graph["structmat_attention.variants"]
    assert "structmat_attention.experiments._runner" in graph["structmat_attention.experiments.icl"]


def test_no_import_cycle_among_module_top_levels():
    """A submodule importing its package's ``__init__`` (which imports every submodule) counts as a cycle too."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt in graph and nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


# name -> the modules it was importable from before the split (each must still give the same object)
_WHERE = {
    "Level": ("functional", "levels"),
    "LevelFeatures": ("functional", "levels"),
    "attention_features": ("functional", "levels"),
    "level_features": ("functional", "levels"),
    "resolve_scale": ("functional", "levels"),
    "METHODS": ("functional",),
    "bilinear_scores": ("functional",),
    "structured_attention": ("functional",),
    "attend": ("functional",),
    "attention_path": ("functional",),
    "LevelSpec": ("layers", "levels"),
    "KVCache": ("layers",),
    "StructuredAttention": ("layers",),
    "standard_attention": ("layers", "variants"),
    "bilinear_btt_attention": ("layers", "variants"),
    "bilinear_mlr_attention": ("layers", "variants"),
    "mlr_attention": ("layers", "variants"),
    "sliding_window_attention": ("layers", "variants"),
    "gswa_attention": ("layers", "variants"),
    "AttentionCost": ("cost",),
    "GPT": ("model",),
}


@pytest.mark.parametrize("name", sorted(_WHERE))
def test_public_names_importable_from_their_old_and_new_modules(name):
    for module in _WHERE[name]:
        mod = importlib.import_module(f"structmat_attention.{module}")
        obj = getattr(mod, name)
        if name in structmat_attention.__all__:
            assert obj is getattr(structmat_attention, name)


def test_every_public_module_lists_only_names_it_has():
    for module in ("functional", "levels", "layers", "variants", "cost", "model"):
        mod = importlib.import_module(f"structmat_attention.{module}")
        for name in mod.__all__:
            getattr(mod, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        importlib.import_module("structmat_attention.layers").nope  # noqa: B018


def test_the_package_api_is_unchanged():
    assert structmat_attention.__all__ == [
        "Level",
        "bilinear_scores",
        "structured_attention",
        "attention_features",
        "attend",
        "attention_path",
        "LevelFeatures",
        "level_features",
        "resolve_scale",
        "LevelSpec",
        "KVCache",
        "StructuredAttention",
        "standard_attention",
        "bilinear_btt_attention",
        "bilinear_mlr_attention",
        "mlr_attention",
        "sliding_window_attention",
        "gswa_attention",
        "AttentionCost",
        "CostPart",
        "pairs_joined",
        "TransformerBlock",
        "GPT",
    ]
