"""The relay's session limits fire in the relay's own session shape (real PostgreSQL).

A relay frozen inside a transaction must not hold its locks for long
(``idle_in_transaction_session_timeout``), another relay must not wait on
them for long (``lock_timeout``) in its mark or its rebalance, and a runaway
statement ends (``statement_timeout``). Small lease TTLs keep this to seconds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import outbox
from outbox.cli import settings as config
from outbox.cli.runner import build_relay
from outbox.errors import StoreUnavailable
from outbox.relay.listener import NotifyListener
from outbox.relay.loop import Relay, Wakeup
from outbox.store import pgfast, table
from outbox.store.engine import create_outbox_engine, normalize_url
from outbox.store.session import relay_connect_args, session_limits
from outbox.store.sqlstore import SqlStore
from tests.conftest import pg_url

SCHEMA = "https://example.org/schemas/case.json"
TTL = 2.0
IDLE = TTL / 3  # idle_in_transaction_session_timeout
LOCK = TTL / 5  # lock_timeout
MARGIN = 1.0  # scheduling slack on a loaded test host


def test_limits_derive_from_the_lease_ttl() -> None:
    assert session_limits(15) == {
        "idle_in_transaction_session_timeout": 5000,
        "lock_timeout": 3000,
        "statement_timeout": 60000,
        "tcp_keepalives_idle": 3,
        "tcp_keepalives_interval": 3,
        "tcp_keepalives_count": 3,
        "tcp_user_timeout": 15000,
    }
    args = relay_connect_args(normalize_url("postgresql://h/db"), 15)
    assert args["keepalives"] == 1
    assert (args["keepalives_idle"], args["keepalives_interval"]) == (3, 3)
    assert args["tcp_user_timeout"] == 15000
    assert "-c lock_timeout=3000" in args["options"]
    # What the URL says is kept: its options come last (they win), its keepalives stay.
    given = normalize_url("postgresql://h/db?options=-c%20search_path%3Dapp&keepalives_idle=30")
    args = relay_connect_args(given, 15)
    assert args["options"].endswith(" -c search_path=app")
    assert "keepalives_idle" not in args
    assert relay_connect_args(normalize_url("sqlite:///x.db"), 15) == {}


@pytest.fixture
def relay(pg_url_fixture: str) -> Iterator[Relay]:
    """A relay as `outbox relay` builds it, with a 2 s lease TTL (never connects to a broker)."""
    values: dict[str, Any] = {
        "database_url": pg_url_fixture,
        "broker_url": "amqp://guest:guest@127.0.0.1:5672//",
        "exchange": "outbox-test-unused",
        "batch_size": 100,
        "poll_interval": 1.0,
        "lease_ttl": TTL,
        "confirm_timeout": 5.0,
        "unroutable": "retry",
        "source": "/test",
        "prepared_statements": False,
    }
    relay = build_relay(config.load(values, "relay", environ={}))
    yield relay
    relay.publisher.close()
    relay.store.engine.dispose()


def publish(engine: Engine, count: int) -> None:
    with Session(engine) as session, session.begin():
        for i in range(count):
            outbox.publish(
                session,
                outbox.Envelope(action="update", schema=SCHEMA, content={"tenantId": 1, "id": i}),
            )


def admin(database: str) -> psycopg.Connection[Any]:
    """A connection without the relay's limits (an operator's psql, an older relay)."""
    return psycopg.connect(pg_url(database))


def database_of(engine: Engine) -> str:
    name = engine.url.database
    assert name is not None
    return name


def test_relay_sessions_carry_the_limits(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    names = "lock_timeout, idle_in_transaction_session_timeout, statement_timeout, tcp_user_timeout"
    query = f"SELECT {', '.join(f'current_setting({n!r})' for n in names.split(', '))}"
    with relay.store.engine.connect() as connection:
        shown = tuple(connection.exec_driver_sql(query).one())
        raw = connection.connection.driver_connection
        assert raw is not None
        client = raw.info.get_parameters()
    assert shown == ("400ms", "667ms", "8s", "2000")
    assert (client["keepalives"], client["keepalives_idle"], client["tcp_user_timeout"]) == (
        "1",
        "1",
        "2000",
    )

    # The NOTIFY listener's connection too.
    seen: list[tuple[Any, ...]] = []
    connect = psycopg.connect

    def recording_connect(*args: Any, **kwargs: Any) -> Any:
        conn = connect(*args, **kwargs)
        row = conn.execute(query).fetchone()
        assert row is not None
        seen.append(tuple(row))
        return conn

    monkeypatch.setattr(psycopg, "connect", recording_connect)
    url = relay.store.engine.url
    listener = NotifyListener(url, Wakeup(), connect_args=relay_connect_args(url, TTL))
    listener.start()
    try:
        assert listener.listening.wait(10)
    finally:
        listener.stop()
    assert seen == [("400ms", "667ms", "8s", "2000")]


def _wait_for_exit(database: str, pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    with admin(database) as conn:
        conn.autocommit = True
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if row.fetchone() == (0,):
                return True
            time.sleep(0.05)
    return False


def _lock_rows(connection: Any, positions: list[int]) -> None:
    """The mark's row locks, by a plain statement: no pipeline, so no commit in it."""
    connection.execute(
        "UPDATE outbox_event SET attempts = attempts + 1 WHERE position = ANY(%s)", (positions,)
    )


def test_a_relay_frozen_right_after_its_mark_holds_no_locks(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(a) The mark's pipeline commits in its round trip: nothing is left idle in transaction.

    psycopg ends a pipeline with Sync then Flush, and PostgreSQL's
    idle-in-transaction timer, armed by the Sync, is disarmed by the Flush:
    a relay frozen after the pipeline of an open transaction would keep its
    locks however long it stays frozen.
    """
    store, engine = relay.store, relay.store.engine
    publish(engine, 5)
    partitions = store.rebalance("frozen", TTL).partitions
    positions = [r.position for r in store.mark_and_fetch([], partitions, 100, owner="frozen")]
    assert len(positions) == 5
    frozen = threading.Event()
    thawed = threading.Event()
    backend: list[int] = []
    real = pgfast.mark_and_fetch

    def mark_then_freeze(connection: Any, **kwargs: Any) -> Any:
        result = real(connection, **kwargs)
        backend.append(connection.info.backend_pid)
        frozen.set()
        thawed.wait(10)  # SIGSTOP, as far as the server can tell
        return result

    monkeypatch.setattr(pgfast, "mark_and_fetch", mark_then_freeze)
    thread = threading.Thread(
        target=store.mark_and_fetch, args=(positions, partitions, 100), kwargs={"owner": "frozen"}
    )
    thread.start()
    try:
        assert frozen.wait(10)
        with admin(database_of(engine)) as conn:
            state = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", backend)
            assert state.fetchall() == [("idle",)]
            conn.execute("SET lock_timeout = '100ms'")
            _lock_rows(conn, positions)  # not locked by the frozen relay
            states = conn.execute(
                "SELECT DISTINCT state FROM outbox_event WHERE position = ANY(%s)", (positions,)
            )
            assert states.fetchall() == [("delivered",)]  # and its mark committed
            conn.rollback()
    finally:
        thawed.set()
        thread.join(10)


def test_a_frozen_relays_transaction_is_ended_by_the_server(relay: Relay) -> None:
    """(a) A relay session idle in a transaction holding row locks is ended after the timeout."""
    store, engine = relay.store, relay.store.engine
    database = database_of(engine)
    publish(engine, 5)
    partitions = store.rebalance("frozen", TTL).partitions
    positions = [r.position for r in store.mark_and_fetch([], partitions, 100, owner="frozen")]
    holding = threading.Event()
    backend: list[int] = []

    def lock_then_freeze(connection: Connection) -> None:
        raw = connection.connection.driver_connection
        assert raw is not None
        _lock_rows(raw, positions)
        backend.append(raw.info.backend_pid)
        holding.set()
        time.sleep(IDLE + 2 * MARGIN)  # frozen, idle in its transaction

    outcome: list[BaseException | None] = []

    def frozen_relay() -> None:
        try:
            store._run(lock_then_freeze)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=frozen_relay)
    thread.start()
    assert holding.wait(10)
    held_at = time.monotonic()
    # A session without limits waits for the locks: until the server ends the frozen one.
    with admin(database) as conn:
        _lock_rows(conn, positions)
        waited = time.monotonic() - held_at
        conn.rollback()
    assert IDLE - 0.2 < waited < IDLE + MARGIN, waited
    assert _wait_for_exit(database, backend[0])
    thread.join(10)
    # Woken up, the frozen relay learns it lost its session: retryable.
    assert isinstance(outcome[0], StoreUnavailable), outcome
    assert "idle-in-transaction" in str(outcome[0])
    # The pool dropped the dead connection: the retry runs on a new session.
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT pg_backend_pid()").scalar() != backend[0]
    store.mark_and_fetch(positions, partitions, 100, owner="frozen")
    assert store.counts()["delivered"] == 5


def test_a_mark_waits_on_locks_at_most_lock_timeout(relay: Relay) -> None:
    """(b) Rows locked by a session without limits: the mark gives up after lock_timeout."""
    store, engine = relay.store, relay.store.engine
    publish(engine, 3)
    partitions = store.rebalance("survivor", TTL).partitions
    positions = [r.position for r in store.mark_and_fetch([], partitions, 100, owner="survivor")]
    with admin(database_of(engine)) as holder:
        _lock_rows(holder, positions)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            store.mark_and_fetch(positions, partitions, 100, owner="survivor")
        waited = time.monotonic() - started
        holder.rollback()
    assert LOCK - 0.05 < waited < LOCK + MARGIN, waited
    # The connection is healthy and stays in the pool; the retry marks the rows.
    store.mark_and_fetch(positions, partitions, 100, owner="survivor")
    assert store.counts()["delivered"] == 3


def test_a_survivor_marks_rows_a_frozen_relay_locked(relay: Relay) -> None:
    """(b) Both relays with limits: the survivor retries and gets through within the bound."""
    store, engine = relay.store, relay.store.engine
    publish(engine, 3)
    partitions = store.rebalance("survivor", TTL).partitions
    positions = [r.position for r in store.mark_and_fetch([], partitions, 100, owner="survivor")]
    frozen = create_outbox_engine(engine.url, connect_args=relay_connect_args(engine.url, TTL))
    try:
        with frozen.connect() as connection:
            raw = connection.connection.driver_connection
            assert raw is not None
            _lock_rows(raw, positions)  # then frozen: idle in transaction
            started = time.monotonic()
            failures = 0
            while True:
                try:
                    store.mark_and_fetch(positions, partitions, 100, owner="survivor")
                    break
                except StoreUnavailable:
                    failures += 1  # the relay loop backs off and retries
                    assert time.monotonic() - started < IDLE + LOCK + MARGIN
            took = time.monotonic() - started
            with pytest.raises(DBAPIError, match="idle-in-transaction"):
                connection.exec_driver_sql("COMMIT")
    finally:
        frozen.dispose()
    print(f"survivor's mark went through after {took:.2f}s ({failures} lock timeouts)")
    assert failures >= 1
    assert store.counts()["delivered"] == 3


def _freeze_in_rebalance(connection: Any, relay_id: str) -> None:
    """Renew ``relay_id``'s heartbeat and leases in an open transaction, as its rebalance does."""
    connection.execute(
        "UPDATE outbox_relay SET heartbeat_at = heartbeat_at WHERE relay_id = %s", (relay_id,)
    )
    connection.execute(
        "UPDATE outbox_partition SET lease_expires_at = lease_expires_at WHERE owner = %s",
        (relay_id,),
    )


def _expire(engine: Engine, relay_id: str) -> None:
    """``relay_id`` stopped renewing an hour ago: stale heartbeat, expired leases."""
    hour = dt.timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            update(table.relay)
            .where(table.relay.c.relay_id == relay_id)
            .values(heartbeat_at=table.relay.c.heartbeat_at - hour)
        )
        connection.execute(
            update(table.partition)
            .where(table.partition.c.owner == relay_id)
            .values(lease_expires_at=table.partition.c.lease_expires_at - hour)
        )


def test_rebalance_waits_on_a_frozen_relays_rows_at_most_lock_timeout(relay: Relay) -> None:
    """(c) The stale-relay DELETE and the claim do not wait on a frozen relay's locks."""
    store, engine = relay.store, relay.store.engine
    peer = SqlStore(engine)
    assert len(peer.rebalance("frozen", TTL).partitions) == 16
    _expire(engine, "frozen")
    with admin(database_of(engine)) as holder:
        _freeze_in_rebalance(holder, "frozen")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            store.rebalance("survivor", TTL)
        waited = time.monotonic() - started
        holder.rollback()
    assert LOCK - 0.05 < waited < LOCK + MARGIN, waited

    # A frozen relay with the limits: the survivor takes everything over once the
    # server ended the frozen session, retrying meanwhile.
    assert len(peer.rebalance("frozen", TTL).partitions) == 16
    _expire(engine, "frozen")
    frozen = create_outbox_engine(engine.url, connect_args=relay_connect_args(engine.url, TTL))
    try:
        with frozen.connect() as connection:
            raw = connection.connection.driver_connection
            assert raw is not None
            _freeze_in_rebalance(raw, "frozen")
            started = time.monotonic()
            owned: list[int] = []
            while len(owned) < 16:
                with contextlib.suppress(StoreUnavailable):  # the loop backs off, retries
                    owned = store.rebalance("survivor", TTL).partitions
                assert time.monotonic() - started < IDLE + LOCK + MARGIN
    finally:
        frozen.dispose()


def test_a_runaway_statement_ends_after_statement_timeout(pg_url_fixture: str) -> None:
    url = normalize_url(pg_url_fixture)
    ttl = 0.5  # statement_timeout 2 s
    store = SqlStore(create_outbox_engine(url, connect_args=relay_connect_args(url, ttl)))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            store._run(lambda c: c.execute(text("SELECT pg_sleep(10)")))
        assert 4 * ttl - 0.05 < time.monotonic() - started < 4 * ttl + MARGIN
    finally:
        store.engine.dispose()
