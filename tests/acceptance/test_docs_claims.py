"""What the operations and quickstart pages say the relay and SQLAlchemy do, checked
against what they do (the /readyz row promised a 503 the relay never
served, and the quickstart's note on `postgresql://` predates SQLAlchemy 2.1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kombu
import pytest
import sqlalchemy
from sqlalchemy import create_engine

from outbox.store import migrate
from outbox.store.engine import create_outbox_engine
from tests.conftest import drain_queue, pg_url
from tests.ops_support import free_port, get, publish_events, relay_values, running_relay, wait_for
from tests.paths import ROOT

OUTBOX = str(Path(sys.executable).parent / "outbox")


def test_a_relay_without_outbox_tables_exits_before_it_serves_readyz(
    empty_pg_database: str, amqp_url: str
) -> None:
    """operations.md: no probe gets an answer from a relay that cannot start."""
    result = subprocess.run(
        [OUTBOX, "relay", "--http-port", str(free_port()), "--log-format", "json"],
        env={
            "PATH": "/usr/bin:/bin",
            "OUTBOX_DATABASE_URL": pg_url(empty_pg_database),
            "OUTBOX_BROKER_URL": amqp_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()  # no record: not even http_started
    assert line.startswith("outbox: ") and "run `outbox migrate`" in line, line


def test_readyz_fails_on_another_revision_while_the_relay_publishes(
    empty_pg_database: str, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    """operations.md: 503 for a schema at another revision, the relay publishing meanwhile."""
    engine = create_outbox_engine(pg_url(empty_pg_database))
    try:
        migrate.upgrade(engine, revision="outbox_0001")  # the tables of an older release
        head = migrate.head_revision(engine)
        assert head != "outbox_0001"
        publish_events(engine, 1, range(1, 4))
        port = free_port()
        values = relay_values(
            database_url=pg_url(empty_pg_database),
            broker_url=amqp_url,
            exchange=exchange_name,
            http_port=str(port),
        )
        with running_relay(values):
            status, body = wait_for(lambda: (r := get(port, "/readyz"))[0] and r, what="/readyz")
            assert status == 503
            assert f"schema at revision outbox_0001, expected {head}" in json.loads(body)["detail"]
            assert len(drain_queue(amqp_url, bound_queue, expected=3)) == 3
            assert get(port, "/livez")[0] == 200
            migrate.upgrade(engine)
            wait_for(lambda: get(port, "/readyz")[0] == 200, what="/readyz after migrate")
    finally:
        engine.dispose()


def test_operations_page_says_what_readyz_does() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `/readyz` |")]
    assert "has not run" not in row  # the relay exits at start instead (test above)
    assert "another revision" in row
    assert "exits before its HTTP server listens" in " ".join(text.split())


@pytest.mark.skipif(
    tuple(int(n) for n in sqlalchemy.__version__.split(".")[:2]) < (2, 1),
    reason="SQLAlchemy 2.0 maps postgresql:// to psycopg2",
)
def test_plain_postgresql_urls_use_psycopg_3_from_sqlalchemy_2_1() -> None:
    """The quickstart's driver note: with SQLAlchemy 2.1, a service's own create_engine
    needs no `+psycopg` either; `postgresql+psycopg://` works with 2.0 and 2.1."""
    for url in ("postgresql://app@db.internal/app", "postgresql+psycopg://app@db.internal/app"):
        engine = create_engine(url)
        assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
        engine.dispose()
