"""The engine's layering: imports of engine modules sit at module top level (none hidden inside a
function to dodge a cycle), the import graph is acyclic apart from method files registering themselves,
and the engine never imports gradio."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "merging_core"
# Deferred on purpose, each with its reason: importing these costs every CLI command and app start time.
DEFERRED = {"merging_core.sweep.runner": {"merging_core.sweep.tuning"}}  # Ray Tune: ~1.3 s


def _module(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(path: Path, node: ast.ImportFrom) -> list[str]:
    """The engine modules an `from .x import y` names (y too, when y is a module)."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if _exists(n)] or [base]


def _exists(module: str) -> bool:
    path = ENGINE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {}
    hidden = []
    for path in sorted(ENGINE.rglob("*.py")):
        name = _module(path)
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        edges.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if id(node) not in top and not set(_target(path, node)) <= DEFERRED.get(name, set()):
                    hidden.append(f"{name}: line {node.lineno}")
                edges[name].update(t for t in _target(path, node) if t != name)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and
                                                        node.module else [])
                assert not any(n and n.split(".")[0] == "gradio" for n in names), f"{name} imports gradio"
    return edges, hidden


def test_no_engine_import_hides_inside_a_function():
    _, hidden = _graph()
    assert hidden == []


def test_the_import_graph_is_acyclic_apart_from_method_registration():
    edges, _ = _graph()
    facade = "merging_core"  # the package re-exports the API; nothing below imports it
    assert not any(facade in targets for name, targets in edges.items() if name != facade), \
        [n for n, t in edges.items() if facade in t]
    registry = "merging_core.methods"
    for name, targets in edges.items():
        if name.startswith(registry + ".") and registry in targets:  # a method file registering itself
            targets.discard(registry)
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt == facade:
                continue
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node != facade and node not in state:
            visit(node, [])
