"""The package's layout: no import cycle, the training core imports no feature, the library
imports no tool. Imports inside functions count too (they hid a cycle before)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FEATURES = ("sdfa.privacy", "sdfa.distributed", "sdfa.alignment_log", "sdfa.app")


def module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / "sdfa").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The sdfa modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "sdfa.privacy.training" in graph["sdfa.app.build"]  # imported in a function
    assert "sdfa.training.callbacks" in graph["sdfa.training"]


def test_no_import_cycle_in_sdfa():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("core", ["sdfa.training", "sdfa.tasks"])
def test_the_training_core_imports_no_feature(core):
    graph = import_graph()
    for name, imported in graph.items():
        if name == core or name.startswith(core + "."):
            bad = sorted(m for m in imported if m.startswith(FEATURES))
            assert not bad, f"{name} imports {bad}"


def test_the_library_imports_no_tool():
    """Only sdfa/__init__ (for sdfa.load_run) and the app itself may import sdfa.app."""
    for name, imported in import_graph().items():
        if name in ("sdfa", "sdfa.__main__") or name.startswith("sdfa.app"):
            continue
        bad = sorted(m for m in imported if m.startswith("sdfa.app"))
        assert not bad, f"{name} imports {bad}"
