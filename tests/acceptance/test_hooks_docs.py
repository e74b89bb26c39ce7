"""docs/sqlalchemy.md is executed: its Python blocks run in order in one module."""

from __future__ import annotations

import re
import sys
import types

import pytest
from sqlalchemy import Engine

from tests.paths import ROOT

DOC = ROOT / "docs" / "sqlalchemy.md"
BLOCK = re.compile(r"```python\n(?P<code>.*?)```", re.S)


def test_sqlalchemy_page_runs(pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module: SQLAlchemy resolves string annotations through sys.modules.
    module = types.ModuleType("outbox_docs_sqlalchemy")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    module.__dict__["engine"] = pg_engine
    blocks = list(BLOCK.finditer(DOC.read_text("utf-8")))
    for block in blocks:
        code = compile(block["code"], f"{DOC.name} block at offset {block.start()}", "exec")
        exec(code, module.__dict__)
    assert len(blocks) == 6
