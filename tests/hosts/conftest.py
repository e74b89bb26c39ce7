"""The hosts suite's lab: two relay hosts (network namespaces), a PostgreSQL and a RabbitMQ.

Started once per run of this package and torn down in ``finally`` (also when a test
fails); a run that crashed is cleaned up by the next one
(``harness.clean_leftovers``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine

from outbox.store import migrate
from outbox.store.engine import create_outbox_engine
from tests.hosts import harness

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("hosts suite: partitions and freezes")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@dataclass
class Lab:
    network: harness.Network
    pg: harness.PgCluster
    rabbit: harness.RabbitNode
    template: str


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="package")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        _unavailable("the hosts suite needs root (network namespaces)")
    missing = harness.missing_tools()
    if missing:
        _unavailable(f"the hosts suite needs {', '.join(missing)}")
    harness.clean_leftovers()
    base = Path(tempfile.mkdtemp(prefix="outbox-hosts-"))
    base.chmod(0o755)  # the postgres user reaches its data dir inside
    network = harness.Network(2)
    pg = harness.PgCluster(base / "pg")
    rabbit = harness.RabbitNode(base / "rabbit")
    try:
        network.create()
        pg.start()
        rabbit.start()
        template = "outbox_hosts_template"
        pg.create_database(template)
        engine = create_outbox_engine(pg.url_from_hosts(template))
        migrate.upgrade(engine)
        engine.dispose()
        yield Lab(network, pg, rabbit, template)
    finally:
        rabbit.stop()
        pg.stop()
        network.destroy()
        harness.STATE_FILE.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def database(lab: Lab) -> str:
    """A fresh migrated database on the lab's PostgreSQL (16 partitions)."""
    name = f"outbox_hosts_{uuid.uuid4().hex[:10]}"
    lab.pg.create_database(name, template=lab.template)
    return name


@pytest.fixture
def engine(lab: Lab, database: str) -> Iterator[Engine]:
    """The producers' engine, in the root namespace (they are not on the relay hosts)."""
    engine = create_outbox_engine(
        lab.pg.url_from_hosts(database),
        pool_size=8,
        connect_args={"options": "-c synchronous_commit=off"},
    )
    yield engine
    engine.dispose()
