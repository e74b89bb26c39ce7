"""Shared fixtures: a fresh PostgreSQL database per test (cloned from a migrated
template), unique RabbitMQ exchanges and queues, and SQLite engines.

Tests that need PostgreSQL or RabbitMQ skip with a reason when the service is
not running, except under CI (``CI`` set), where they fail instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import psycopg
import pytest
from sqlalchemy import Engine

from outbox import redaction
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine

PG_ADMIN_URL = os.environ.get(
    "OUTBOX_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_URL_TEMPLATE = os.environ.get(
    "OUTBOX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/{database}"
)
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
TEMPLATE_DB = f"outbox_template_{os.getpid()}"


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Forget the secrets a test registered: settings.resolve registers them process-wide."""
    redaction.clear_secrets()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI, run in this process, configures the root and ``outbox`` loggers
    (outbox.ops.logformat): put them back, so that no test runs with another's logging."""
    root, own = logging.getLogger(), logging.getLogger("outbox")
    saved = (root.handlers[:], root.level, own.handlers[:], own.level, own.propagate)
    excepthook = threading.excepthook
    try:
        yield
    finally:
        root.handlers[:], root.level, own.handlers[:], own.level, own.propagate = saved
        threading.excepthook = excepthook


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def pg_url(database: str) -> str:
    return PG_URL_TEMPLATE.format(database=database)


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A database migrated once per test session; each test clones it."""
    try:
        admin = _admin()
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    engine = create_outbox_engine(pg_url(TEMPLATE_DB))
    migrate.upgrade(engine)
    engine.dispose()
    yield TEMPLATE_DB
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')


def create_database(template: str | None = None) -> str:
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        clause = f' TEMPLATE "{template}"' if template else ""
        admin.execute(f'CREATE DATABASE "{name}"{clause}')
    return name


def drop_database(name: str) -> None:
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_template: str) -> Iterator[str]:
    """The name of a fresh, migrated database (16 partitions)."""
    name = create_database(pg_template)
    yield name
    drop_database(name)


@pytest.fixture
def empty_pg_database() -> Iterator[str]:
    """A fresh database with no tables at all."""
    try:
        _admin().close()
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    name = create_database()
    yield name
    drop_database(name)


@pytest.fixture
def pg_engine(pg_database: str) -> Iterator[Engine]:
    engine = create_outbox_engine(pg_url(pg_database))
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url_fixture(pg_database: str) -> str:
    return pg_url(pg_database)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_outbox_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as connection:
            connection.connect()
    except Exception as exc:
        _unavailable("RabbitMQ", exc)
    return AMQP_URL


@pytest.fixture
def exchange_name(amqp_url: str) -> Iterator[str]:
    """A unique topic exchange, deleted after the test."""
    name = f"outbox-test-{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(amqp_url) as connection:
        channel = connection.channel()
        with contextlib.suppress(Exception):
            channel.exchange_delete(name)


@pytest.fixture
def bound_queue(amqp_url: str, exchange_name: str) -> Iterator[kombu.Queue]:
    """A queue bound to every routing key (``#``) of the test exchange."""
    queue = kombu.Queue(
        f"{exchange_name}-all",
        exchange=kombu.Exchange(exchange_name, type="topic", durable=True),
        routing_key="#",
        durable=True,
        auto_delete=False,
    )
    with kombu.Connection(amqp_url) as connection:
        queue(connection.default_channel).declare()
    yield queue
    with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
        queue(connection.default_channel).delete()


def drain_queue(
    amqp_url: str, queue: kombu.Queue, *, expected: int, timeout: float = 30.0
) -> list[Any]:
    """Consume until ``expected`` messages arrived or ``timeout`` passed; ack them all."""
    import time

    received: list[Any] = []
    deadline = time.monotonic() + timeout
    with kombu.Connection(amqp_url) as connection:
        bound = queue(connection.default_channel)
        while len(received) < expected and time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is None:
                time.sleep(0.02)
                continue
            received.append(message)
    return received
