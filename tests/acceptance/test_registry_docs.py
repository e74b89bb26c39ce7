"""docs/schemas.md is executed: its files are written, its `outbox schemas` commands
run, and its Python blocks run in order in one namespace, against PostgreSQL and RabbitMQ."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kombu
import pytest
from sqlalchemy import Engine

from outbox.cli.main import main
from tests.paths import ROOT

DOC = ROOT / "docs" / "schemas.md"
BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def test_schemas_page_runs(
    pg_engine: Engine,
    pg_url_fixture: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", pg_url_fixture)
    namespace: dict[str, object] = {
        "engine": pg_engine,
        "consumer_engine": pg_engine,
        "broker_url": amqp_url,
        "exchange": exchange_name,
        "queue": bound_queue,
    }
    ran = {"file": 0, "command": 0, "python": 0}
    for block in BLOCK.finditer(DOC.read_text("utf-8")):
        code = block["code"]
        if block["file"]:
            target = tmp_path / block["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code, "utf-8")
            ran["file"] += 1
        elif block["lang"] == "bash":
            for line in code.splitlines():
                if line.startswith("outbox schemas "):
                    assert main(shlex.split(line)[1:]) == 0, line
                    ran["command"] += 1
        elif block["lang"] == "python":
            exec(compile(code, f"{DOC.name} block at {block.start()}", "exec"), namespace)
            ran["python"] += 1
    assert ran == {"file": 2, "command": 3, "python": 6}
