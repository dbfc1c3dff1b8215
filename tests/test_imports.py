"""The package's import structure: no cycles, and imports inside functions only where they
load an optional or heavy dependency.

The import graph is read from the source (every ``import`` at module level, ``if
TYPE_CHECKING`` blocks included), so a cycle is found even where import order happens to hide
it at run time. Fresh interpreters check that ``import repfuse.cli`` and ``import repfuse`` work
on their own.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import repfuse

PACKAGE = Path(repfuse.__file__).parent

# Imports allowed inside a function: libraries only one format needs, imported where that format
# is read or written (onnx and onnxsim take about a second to import).
ALLOWED_IN_FUNCTIONS = {"onnx", "onnxsim", "onnxruntime"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, current: str, known: set[str]) -> list[str]:
    """The repfuse modules an import statement imports."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = current.split(".")[: -node.level or None]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                 for alias in node.names]
    return [n for n in names if n == "repfuse" or n.startswith("repfuse.")]


def top_level_imports(path: Path) -> list[ast.AST]:
    """Import statements that run when the module is imported (not inside functions)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def function_imports(path: Path) -> list[ast.AST]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and inner not in found:
                    found.append(inner)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        targets = set()
        for node in top_level_imports(path):
            targets.update(t for t in imported(node, name, known) if t != name)
        graph[name] = targets
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how packages are built
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "repfuse.cli" in graph and "repfuse.export.onnx" in graph
    assert cycle_in(graph) is None, " -> ".join(cycle_in(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None


def test_imports_inside_functions_are_only_of_optional_or_heavy_libraries():
    known = set(modules())
    found = []
    for name, path in modules().items():
        for node in function_imports(path):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                targets = imported(node, name, known) or [node.module or ""]
            for target in targets:
                if target.split(".")[0] in ALLOWED_IN_FUNCTIONS or target in ALLOWED_IN_FUNCTIONS:
                    continue
                found.append(f"{name}:{node.lineno} imports {target}")
    assert found == []


@pytest.mark.parametrize("statement", ["import repfuse.cli", "import repfuse",
                                       "import repfuse.export", "import repfuse.models"])
def test_each_entry_point_imports_first_in_a_fresh_interpreter(statement):
    done = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
