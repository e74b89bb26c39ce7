"""The package's layering, read from its imports (docs/architecture.md).

Imports run downwards only: a part may import the parts below it in
:data:`LAYERS`, never one above or beside it in the same layer, so that no
chain of imports between parts is longer than the layers are many.
"""

from __future__ import annotations

from pathlib import Path

from tests.unit.import_graph import cycles, file_graph, longest_chain, part_graph

ROOT = Path(__file__).resolve().parents[2]

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
