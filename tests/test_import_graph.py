"""No import circles in bot/ or generation/: every intra-project import counts, at module level,
inside a function, or under `if TYPE_CHECKING:` (a circle hidden in a function still means the
two files can't be understood, tested or moved apart)."""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "generation")


@dataclass(frozen=True)
class Edge:
    target: str
    line: int


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> dict[str, Edge]:
    """The project modules `name` imports, anywhere in the file, each with its first line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, Edge] = {}

    def add(target: str, line: int) -> None:
        if target != name and target not in found:
            found[target] = Edge(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    add(f"{base}.{alias.name}", node.lineno)
                elif base in known:
                    add(base, node.lineno)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, Edge]]:
    known = modules(root, packages)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, dict[str, Edge]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan's, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                child = pending.pop()
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, sorted(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def shortest_cycle(graph: dict[str, dict[str, Edge]], component: frozenset[str]) -> str:
    """One concrete way round a circle, with the line of each import, to say where to cut."""
    start = min(component)
    came_from: dict[str, tuple[str, Edge]] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target, edge in sorted(graph[node].items()):
            if target not in component:
                continue
            if target == start:
                steps = [(node, edge)]
                while steps[-1][0] != start:
                    steps.append(came_from[steps[-1][0]])
                steps.reverse()
                hops = [f"{source} (line {e.line})" for source, e in steps]
                return " -> ".join([*hops, start])
            if target not in came_from:
                came_from[target] = (node, edge)
                queue.append(target)
    return ", ".join(sorted(component))


def describe(graph: dict[str, dict[str, Edge]], found: list[frozenset[str]]) -> str:
    return "\n".join(
        f"{len(c)} modules: {sorted(c)}\n    e.g. {shortest_cycle(graph, c)}" for c in found
    )


def test_there_are_no_import_circles() -> None:
    graph = import_graph(REPO)
    found = circles(graph)
    assert not found, "import circles:\n" + describe(graph, found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_circle_through_a_function_or_type_checking_import_is_found(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from . import c\n",
            "pkg/c.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"),
            "pkg/sub/__init__.py": "",
            "pkg/sub/d.py": "from ..c import x\n",
            "pkg/e.py": "import pkg.sub.d\n",
        },
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub.d"].keys() == {"pkg.c"}
    found = circles(graph)
    assert found == [frozenset({"pkg.a", "pkg.b", "pkg.c"})]
    assert shortest_cycle(graph, found[0]) == (
        "pkg.a (line 1) -> pkg.b (line 2) -> pkg.c (line 3) -> pkg.a"
    )


def test_a_tree_without_circles_has_none(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": "from . import c\n",
            "pkg/c.py": "",
        },
    )
    assert circles(import_graph(tmp_path, ("pkg",))) == []
