"""Partition fencing and the one-round-trip mark-and-fetch of the relay's hot path."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import kombu
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

import outbox
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.message import build_message
from outbox.relay.publisher import CONNECTION, AmqpPublisher, open_publisher, publish_batch
from outbox.store import table
from outbox.store.engine import create_outbox_engine
from outbox.store.rows import EventRow
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue

SCHEMA = "https://example.org/schemas/case.json"


def publish(engine: Engine, count: int, tenant: int = 1) -> None:
    with Session(engine) as session, session.begin():
        for i in range(count):
            outbox.publish(
                session,
                outbox.Envelope(
                    action="update", schema=SCHEMA, content={"tenantId": tenant, "id": i}
                ),
            )


def expire_leases(engine: Engine) -> None:
    """As if every relay had stalled for an hour: leases and heartbeats expired."""
    with engine.begin() as connection:
        connection.execute(
            update(table.partition).values(
                lease_expires_at=table.partition.c.lease_expires_at - dt.timedelta(hours=1)
            )
        )
        connection.execute(
            update(table.relay).values(
                heartbeat_at=table.relay.c.heartbeat_at - dt.timedelta(hours=1)
            )
        )


def check_mark_and_fetch(engine: Engine) -> None:
    store = SqlStore(engine)
    publish(engine, 10)
    partitions = store.rebalance("relay-a", 30).partitions
    assert len(partitions) == 16

    first = store.mark_and_fetch([], partitions, 4, owner="relay-a")
    assert [r.position for r in first] == sorted(r.position for r in first)
    assert len(first) == 4
    # Marking and fetching in one go: the marked rows are delivered and not returned.
    second = store.mark_and_fetch([r.position for r in first], partitions, 100, owner="relay-a")
    assert {r.position for r in second}.isdisjoint({r.position for r in first})
    assert len(second) == 6
    assert store.counts()["delivered"] == 4
    # Exclusion by exact position (rows in flight).
    third = store.mark_and_fetch([], partitions, 100, [second[0].position], owner="relay-a")
    assert [r.position for r in third] == [r.position for r in second[1:]]

    # Once another relay holds the partitions, relay-a's fetch is fenced off.
    expire_leases(engine)
    assert len(store.rebalance("relay-b", 30).partitions) == 16
    assert store.mark_and_fetch([], partitions, 100, owner="relay-a") == []
    assert len(store.mark_and_fetch([], partitions, 100, owner="relay-b")) == 6
    # Without an owner (tools, tests) nothing is fenced.
    unfenced = store.mark_and_fetch([], partitions, 100)
    assert len(unfenced) == 6
    # Rows built positionally by the fast path equal rows built by column name.
    assert unfenced == store.fetch_pending(partitions, 100)


def test_mark_and_fetch_postgresql(pg_engine: Engine) -> None:
    check_mark_and_fetch(pg_engine)


def test_mark_and_fetch_sqlite(sqlite_engine: Engine) -> None:
    check_mark_and_fetch(sqlite_engine)


def test_relay_that_lost_its_partitions_publishes_nothing(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    publish(pg_engine, 5)
    stale = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(lease_ttl=60),
        relay_id="stale",
    )
    stale._maybe_rebalance(time.monotonic())
    assert len(stale.partitions) == 16  # its local lease is still valid for a while

    # It stalls (say a long pause) while its leases expire and another relay claims them.
    expire_leases(pg_engine)
    assert len(SqlStore(pg_engine).rebalance("successor", 60).partitions) == 16

    assert stale.drain(timeout=5) == 0
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.5) == []

    successor = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(lease_ttl=60),
        relay_id="successor",
    )
    assert successor.drain(timeout=30) == 5
    messages = drain_queue(amqp_url, bound_queue, expected=5)
    assert [json.loads(m.body)["resource"]["content"]["id"] for m in messages] == list(range(5))
    with pg_engine.connect() as connection:
        owners = connection.execute(select(table.partition.c.owner)).scalars().all()
    assert set(owners) == {None}  # released at the end of drain


def _row() -> EventRow:
    return EventRow(
        position=1,
        event_id=str(uuid.uuid4()),
        ordering_key="case:1:1",
        partition=0,
        routing_key="case.update",
        resource_type="case",
        payload=json.dumps({"action": "update", "resource": {"schema": SCHEMA, "content": {}}}),
        headers=None,
        schema_version=None,
        created_at=dt.datetime.now(dt.UTC),
        attempts=0,
    )


def test_idle_publisher_keeps_its_broker_connection(
    amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    # A 1 s heartbeat: the broker drops a silent client after about 2 s.
    kept = AmqpPublisher(amqp_url, exchange_name, heartbeat=1)
    silent = AmqpPublisher(amqp_url, exchange_name, heartbeat=1)
    kept.connect()
    silent.connect()
    idle_until = time.monotonic() + 3.5
    while time.monotonic() < idle_until:  # the relay's idle loop, between polls
        kept.keepalive()
        time.sleep(0.2)
    message = build_message(_row(), "update", SCHEMA, source="/test")
    assert publish_batch(kept, [message], 10).confirmed == 1
    assert publish_batch(silent, [message], 10).failure == CONNECTION  # what keepalive prevents
    kept.close()
    silent.close()


def test_mark_and_fetch_without_prepared_statements(pg_url_fixture: str) -> None:
    # As behind PgBouncer < 1.21 in transaction mode: `--prepared-statements off`.
    engine = create_outbox_engine(pg_url_fixture, connect_args={"prepare_threshold": None})
    try:
        store = SqlStore(engine)
        store.prepared_statements = False
        for _ in range(6):  # past psycopg's default threshold of 5
            check_prepared_nothing(engine, store)
        with engine.connect() as connection:
            prepared = connection.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements")
            assert prepared.scalar_one() == 0
    finally:
        engine.dispose()


def check_prepared_nothing(engine: Engine, store: SqlStore) -> None:
    publish(engine, 2)
    partitions = store.rebalance("relay-p", 30).partitions
    rows = store.mark_and_fetch([], partitions, 100, owner="relay-p")
    assert len(rows) == 2
    assert store.mark_and_fetch([r.position for r in rows], partitions, 100, owner="relay-p") == []
