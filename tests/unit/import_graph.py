"""The package's import graph, read from its source: files, parts and chains.

A *part* is a subpackage of ``outbox`` or one of its top-level modules (the
package's own ``__init__`` is the part ``outbox``). Every import counts,
including those inside functions, except the ones under ``if TYPE_CHECKING:``,
which never run.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

PACKAGE = "outbox"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    found: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports_in(child)
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def file_graph(root: Path) -> dict[str, set[str]]:
    """For each module, the package's modules it imports."""
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _absolute(name, node, path.name == "__init__.py")
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                    for alias in node.names
                ]
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


def part_of(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else PACKAGE


def part_graph(files: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph of parts: an arrow wherever some file of one imports a file of another."""
    parts: dict[str, set[str]] = {}
    for source, targets in files.items():
        mine = part_of(source)
        parts.setdefault(mine, set()).update(part_of(t) for t in targets if part_of(t) != mine)
    return parts


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest path of imports, as the nodes it passes (the graph must be acyclic)."""

    @cache
    def from_node(node: str) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for nxt in sorted(graph.get(node, ())):
            candidate = from_node(nxt)
            if len(candidate) > len(best):
                best = candidate
        return (node, *best)

    chains: Iterable[tuple[str, ...]] = (from_node(n) for n in sorted(graph))
    return list(max(chains, key=len, default=()))


if __name__ == "__main__":
    here = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    files = file_graph(here)
    by_file = sum(len(t) for t in files.values())
    print(f"{len(files)} files, {by_file} import arrows")
    print("file cycles:", cycles(files) or "none")
    if not cycles(files):
        chain = longest_chain(files)
        print(f"longest chain of files ({len(chain)}):", " -> ".join(chain))
    parts = part_graph(files)
    print("part cycles:", cycles(parts) or "none")
    for part, targets in sorted(parts.items()):
        print(f"  {part:10} -> {', '.join(sorted(targets))}")
    if not cycles(parts):
        chain = longest_chain(parts)
        print(f"longest chain of parts ({len(chain)}):", " -> ".join(chain))
