"""The package's layering, read from its imports (docs/architecture.md).

Imports run downwards only: a part may import the parts below it in
:data:`LAYERS`, never one above or beside it in the same layer, so that no
chain of imports between parts is longer than the layers are many.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.import_graph import cycles, file_graph, longest_chain, part_graph

ROOT = Path(__file__).resolve().parents[2]

# Where a test lives says what it needs (docs/architecture.md, "Tests").
TEST_KINDS = frozenset(
    {"unit", "integration", "acceptance", "faults", "migrations", "cluster", "hosts", "failover"}
)
# The fixtures and constants of tests/conftest.py that reach a running server.
SERVICE_NAMES = frozenset(
    {
        "AMQP_URL",
        "PG_ADMIN_URL",
        "amqp_url",
        "bound_queue",
        "empty_pg_database",
        "exchange_name",
        "pg_database",
        "pg_engine",
        "pg_template",
        "pg_url",
    }
)

# Top to bottom. A part imports only parts of lower layers.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"cli"}),
    frozenset({"ops", "outbox", "consumer"}),
    frozenset({"relay", "producer"}),
    frozenset({"schemas"}),
    frozenset({"store", "envelope"}),
    frozenset({"errors", "logs", "redaction", "units"}),
)
MAX_CHAIN = 6


def _layer(part: str) -> int:
    for depth, parts in enumerate(LAYERS):
        if part in parts:
            return depth
    raise AssertionError(f"{part} is in no layer: add it to LAYERS and docs/architecture.md")


def test_no_file_imports_itself_through_others() -> None:
    assert cycles(file_graph(ROOT)) == []


def test_imports_between_parts_only_run_downwards() -> None:
    upwards = [
        f"{source} -> {target}"
        for source, targets in part_graph(file_graph(ROOT)).items()
        for target in targets
        if _layer(target) <= _layer(source)
    ]
    assert upwards == []


def test_the_longest_chain_of_parts_is_short() -> None:
    parts = part_graph(file_graph(ROOT))
    assert cycles(parts) == []
    chain = longest_chain(parts)
    assert 1 < len(chain) <= MAX_CHAIN, chain


def test_the_graph_sees_imports_inside_functions_but_not_type_checking_ones(
    tmp_path: Path,
) -> None:
    package = tmp_path / "outbox"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "thing.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from outbox import high\n"
    )
    (package / "high.py").write_text("def f():\n    from outbox.low import thing\n")
    files = file_graph(tmp_path)
    assert files["outbox.high"] == {"outbox.low.thing"}
    assert files["outbox.low.thing"] == set()
    assert part_graph(files)["high"] == {"low"}


def test_every_test_file_sits_under_its_kind() -> None:
    tests = ROOT / "tests"
    misplaced = [
        str(path.relative_to(tests))
        for path in tests.rglob("test_*.py")
        if path.relative_to(tests).parts[0] not in TEST_KINDS
    ]
    assert misplaced == []


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    names |= {
        arg.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for arg in node.args.args
    }
    return names


def test_unit_tests_need_no_server() -> None:
    """A unit test runs on a machine with no PostgreSQL or broker (SQLite is embedded)."""
    reaching = {
        str(path.relative_to(ROOT)): sorted(_names_used(path) & SERVICE_NAMES)
        for path in (ROOT / "tests" / "unit").rglob("*.py")
    }
    assert {path: names for path, names in reaching.items() if names} == {}
