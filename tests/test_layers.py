"""The folders are the architecture: imports run one way only, and revisions are history."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "planbus"

# What each folder may not import (see each folder's __init__.py).
FORBIDDEN = {
    "bus": ("planbus.ops",),
    "llm": ("planbus.bus", "planbus.ops"),
    "schema": ("planbus.bus", "planbus.llm", "planbus.ops", "planbus.settings", "planbus.errors"),
}
# Revisions may import only the frozen schema helpers.
REVISION_ALLOWED = ("planbus.schema.",)


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, absolute names, including imports inside functions."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def wrong_way(folder: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith(FORBIDDEN[folder]):
                found.append(f"{module_name(path)} imports {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_folder_imports_only_what_its_rule_allows(folder: str) -> None:
    assert wrong_way(folder) == []


def test_the_layering_check_sees_a_wrong_way_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from planbus.ops import console\n")
    assert any(n.startswith("planbus.ops") for n in imported_modules(bad))


def test_revisions_import_nothing_that_can_change() -> None:
    found = []
    for path in sorted((ROOT / "alembic" / "versions").glob("*.py")):
        for name in imported_modules(path):
            if name.startswith("planbus") and not name.startswith(REVISION_ALLOWED):
                found.append(f"{path.name} imports {name}")
    assert found == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the planbus modules it imports (an attribute import counts as its module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            parts = imported.split(".")
            prefixes = (".".join(parts[:cut]) for cut in range(len(parts), 0, -1))
            target = next((c for c in prefixes if c in modules), None)
            if target is not None and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[str]:
    found: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"a"}}) == ["a -> b -> a"]


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{module_name(path)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    too_long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert too_long == []
