"""The house's import rules, read from the source: imports point one way (no cycle among
portres's modules, counting imports inside functions too) and no module borrows another's
private (``_underscore``) names.

    python -m pytest tests/test_imports.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"portres": "portres", "backends": "portres.backends", "cli": "portres.cli"}  # folder -> package


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: dict) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import of a portres module in ``path``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in known:
                continue
            names = []
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:  # ``from . import weights``: the submodule itself
                    found.append((submodule, [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((target, names, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = {target for target, _, _ in _imports(name, path, known) if target != name}
        # a package's __init__ importing its own submodules is how a package presents itself, not a cycle
        graph[name] = {target for target in edges if not (path.name == "__init__.py" and target.startswith(name + "."))}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def borrowed_private_names() -> list[str]:
    """``module:line imports _name from other`` for each private name taken from another module (a
    package's private helper modules, such as ``backends._blas``, may be imported whole by their package)."""
    known = modules()
    found = []
    for name, path in known.items():
        imported_modules = {}
        for target, names, line in _imports(name, path, known):
            for taken in names:
                if taken.startswith("_") and not taken.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {taken} from {target}")
            if not names:
                if target.rsplit(".", 1)[-1].startswith("_") and target.rsplit(".", 1)[0] != name.rsplit(".", 1)[0]:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports the private module {target}")
                imported_modules[target.rsplit(".", 1)[-1]] = target
        # ``weights._read_array(...)`` on a module imported whole
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in imported_modules and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr} "
                             f"of {imported_modules[node.value.id]}")
    return sorted(set(found))


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (each group imports itself through the others):\n" + "\n".join(
        " <-> ".join(group) for group in found)


def test_no_module_borrows_another_modules_private_names():
    found = borrowed_private_names()
    assert not found, "private names used across modules (make them public, or move them):\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(source, expected):
    assert cycles(source) == expected


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "portres.plan" in graph["portres.model"]  # ``from .plan import ...`` at module level
    assert all(target in graph for targets in graph.values() for target in targets)
