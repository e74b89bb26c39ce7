"""docs/quickstart.md, executed: every Python block and every ``outbox`` command, in order,
against a fresh (empty) PostgreSQL database and a real RabbitMQ exchange."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import kombu
import pytest

from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore
from tests.conftest import pg_url
from tests.docblocks import code_blocks

OUTBOX = str(Path(sys.executable).parent / "outbox")
SERVICE_SECTION = "Include the outbox migrations in your service's Alembic history"
# Lines of the bash blocks that set up the reader's shell; the test sets up its own.
SETUP_PREFIXES = ("pip ", "export ")


def _run_outbox(command: list[str], env: dict[str, str], database_url: str) -> None:
    if command[:2] == ["outbox", "relay"]:
        _run_relay_until_drained(command, env, database_url)
        return
    result = subprocess.run(
        [OUTBOX, *command[1:]], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{shlex.join(command)}: {result.stderr}"
    if command == ["outbox", "status", "--json"]:
        report = json.loads(result.stdout)
        assert (report["pending"], report["delivered"], report["dead"]) == (0, 4, 0)
        assert report["oldest_pending_age_seconds"] is None


def _run_relay_until_drained(command: list[str], env: dict[str, str], database_url: str) -> None:
    engine = create_outbox_engine(database_url)
    process = subprocess.Popen(
        [OUTBOX, *command[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while SqlStore(engine).counts()["pending"]:
            assert time.monotonic() < deadline, "the relay did not drain the backlog"
            assert process.poll() is None, "the relay exited"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
        engine.dispose()
    assert process.returncode == 0, stderr


def test_quickstart_runs_as_written(
    empty_pg_database: str,
    amqp_url: str,
    exchange_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database_url = pg_url(empty_pg_database).replace("postgresql://", "postgresql+psycopg://")
    for name in [k for k in os.environ if k.startswith("OUTBOX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", database_url)
    monkeypatch.setenv("OUTBOX_BROKER_URL", amqp_url)
    monkeypatch.setenv("OUTBOX_EXCHANGE", exchange_name)
    monkeypatch.setenv("OUTBOX_LOG_FORMAT", "json")
    env = dict(os.environ)
    # A queue name of its own, so that parallel runs never share one.
    queue_name = f"case-events-{uuid.uuid4().hex[:8]}"

    namespace: dict[str, Any] = {"__name__": "quickstart"}
    ran = {"python": 0, "outbox": 0}
    try:
        for block in code_blocks("quickstart.md"):
            if block.section == SERVICE_SECTION:
                continue  # executed by tests/migrations/test_migrations.py
            if block.language == "python":
                code = block.code.replace('"case-events"', repr(queue_name))
                exec(compile(code, "docs/quickstart.md", "exec", dont_inherit=True), namespace)
                ran["python"] += 1
                continue
            assert block.language == "bash", block
            for line in block.code.splitlines():
                command = shlex.split(line, comments=True)
                if not command or line.startswith(SETUP_PREFIXES):
                    continue
                assert command[0] == "outbox", f"unexpected command in the quickstart: {line}"
                _run_outbox(command, env, database_url)
                ran["outbox"] += 1
    finally:
        if "engine" in namespace:
            namespace["engine"].dispose()  # the page's engine: close its pooled connections
        with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
            connection.default_channel.queue_delete(queue_name)

    assert ran == {"python": 5, "outbox": 3}
    printed = [line.split(" ", 2) for line in capsys.readouterr().out.splitlines()]
    assert printed[0][0] == "published"
    consumed = [(key, ast.literal_eval(content)["id"]) for key, _, content in printed[1:]]
    assert [c for c in consumed if c[1] == 42] == [
        ("case.create", 42),
        ("case.update", 42),
        ("case.delete", 42),
    ]
    assert [c for c in consumed if c[1] != 42] == [("case.create", 44)]
