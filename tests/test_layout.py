"""The package's import graph (read from the source with ``ast``, nothing imported): no cycles,
no function-local imports of our own modules, and no package importing one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import mhmoe

SOURCE = Path(mhmoe.__file__).parent
# Packages (or top-level modules) that must not import the application layers above them.
LOWER = ("checks", "config", "layers", "planning", "bitnet", "model", "decoding", "runtime", "data", "runs")
UPPER = ("training", "cli", "bench", "hf", "evaluate", "analytics", "distributed")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> list[tuple[ast.AST, str]]:
    """(node, imported mhmoe module) of every absolute ``import``/``from`` of our package."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("mhmoe"):
                found.append((node, name))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {_module_name(p): p for p in SOURCE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: list[str] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside_functions = {
            id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for sub in ast.walk(fn)
        }
        for node, target in _imports(tree, modules):
            if id(node) in inside_functions:
                local.append(f"{module}:{node.lineno} imports {target} inside a function")
            # A package's own __init__ is imported with any of its modules: not an edge.
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph, _ = _graph()
    assert len(graph) > 50  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_planted_cycle():
    graph, _ = _graph()
    graph["mhmoe.config"].add("mhmoe.training.run")  # training.run imports config, indirectly too
    assert _cycle(graph) is not None


def test_no_function_local_imports_of_our_own_modules():
    _, local = _graph()
    assert local == []


def test_lower_packages_never_import_the_application_layers():
    graph, _ = _graph()

    def package(module: str) -> str:
        return module.split(".")[1] if module.count(".") else ""

    upward = sorted(
        f"{module} -> {target}" for module, targets in graph.items() for target in targets
        if package(module) in LOWER and package(target) in UPPER
    )
    assert upward == []
