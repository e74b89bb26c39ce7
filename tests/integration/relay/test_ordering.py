"""The core guarantee, proved with racing writers on PostgreSQL and a real RabbitMQ queue:
every committed event arrives, no rolled-back one does, and events sharing a key
arrive in the order their transactions committed.

How commit order is recorded: after writing its event (which assigns the row's
position), each transaction increments a per-key counter row and logs the value.
The counter's row lock is held until commit, so for one key the counter values
of committed transactions are in commit order. A transaction that writes its
event first and sleeps is exactly the case where a sequence alone gets the
order wrong: without the producer's per-key lock a later writer could take a
higher position yet commit (and count) first.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import kombu
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

import outbox
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue

SCHEMA = "https://example.org/schemas/case.json"
KEYS = [f"case:1:{n}" for n in range(3)]
WRITERS = 8
TRANSACTIONS_PER_WRITER = 20
LONG_HOLD_SECONDS = 1.5


def setup_commit_log(engine: Engine, keys: list[str]) -> None:
    """Tables that record, per key, the order in which transactions committed
    (``count_commit`` in each transaction): the truth first arrivals are checked against."""
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE commit_counter (key text PRIMARY KEY, n int)"))
        connection.execute(text("CREATE TABLE commit_log (tx uuid PRIMARY KEY, key text, n int)"))
        for key in keys:
            connection.execute(text("INSERT INTO commit_counter VALUES (:k, 0)"), {"k": key})


def count_commit(connection: Connection, key: str, tx: uuid.UUID) -> None:
    n = connection.execute(
        text("UPDATE commit_counter SET n = n + 1 WHERE key = :k RETURNING n"), {"k": key}
    ).scalar_one()
    connection.execute(
        text("INSERT INTO commit_log VALUES (:tx, :k, :n)"), {"tx": tx, "k": key, "n": n}
    )


def _envelope(key: str, tx: uuid.UUID, index: int) -> outbox.Envelope:
    case_id = int(key.rsplit(":", 1)[1])
    return outbox.Envelope(
        action="update",
        schema=SCHEMA,
        content={"tenantId": 1, "id": case_id, "tx": str(tx), "index": index},
    )


def _write(engine: Engine, key: str, *, rng: random.Random, hold: float, rollback: bool) -> None:
    """One producer transaction: events first, then a delay, the commit count, a commit."""
    tx = uuid.uuid4()
    events = rng.choice([1, 1, 2])
    if rng.random() < 0.5:
        with Session(engine) as session:
            session.begin()
            for index in range(events):
                outbox.publish(session, _envelope(key, tx, index))
            outbox.flush_events(session)  # position assigned now, commit comes later
            time.sleep(hold)
            count_commit(session.connection(), key, tx)
            time.sleep(rng.uniform(0, 0.005))
            session.rollback() if rollback else session.commit()
    else:
        with engine.connect() as connection:
            transaction = connection.begin()
            for index in range(events):
                outbox.publish(connection, _envelope(key, tx, index))
            time.sleep(hold)
            count_commit(connection, key, tx)
            transaction.rollback() if rollback else transaction.commit()


def test_racing_writers_arrive_in_commit_order_per_key(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    setup_commit_log(pg_engine, KEYS)
    failures: list[BaseException] = []

    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(batch_size=7, poll_interval=0.02),
    )
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,))
    relay_thread.start()

    long_holds_position = threading.Event()

    def long_transaction() -> None:
        try:
            with Session(pg_engine) as session:
                session.begin()
                tx = uuid.uuid4()
                outbox.publish(session, _envelope(KEYS[0], tx, 0))
                # Written: the row holds an early position; stay open while others commit.
                outbox.flush_events(session)
                long_holds_position.set()
                time.sleep(LONG_HOLD_SECONDS)
                count_commit(session.connection(), KEYS[0], tx)
                session.commit()
        except BaseException as exc:
            failures.append(exc)
            long_holds_position.set()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(TRANSACTIONS_PER_WRITER):
                _write(
                    pg_engine,
                    rng.choice(KEYS),
                    rng=rng,
                    hold=rng.uniform(0, 0.02),
                    rollback=rng.random() < 0.2,
                )
        except BaseException as exc:
            failures.append(exc)

    try:
        long_thread = threading.Thread(target=long_transaction)
        long_thread.start()
        assert long_holds_position.wait(10)
        writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(WRITERS)]
        for thread in writers:
            thread.start()
        for thread in [long_thread, *writers]:
            thread.join(timeout=60)
        assert not failures, failures

        store = SqlStore(pg_engine)
        deadline = time.monotonic() + 20
        while store.counts()["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.counts()["pending"] == 0
    finally:
        stop.set()
        relay_thread.join(timeout=15)
    assert not relay_thread.is_alive()

    with pg_engine.connect() as connection:
        committed = {
            str(tx): (key, n)
            for tx, key, n in connection.execute(text("SELECT tx, key, n FROM commit_log"))
        }
        expected_events = connection.execute(
            text("SELECT count(*) FROM outbox_event WHERE state = 'delivered'")
        ).scalar_one()
    assert len(committed) > WRITERS * TRANSACTIONS_PER_WRITER // 2

    messages = drain_queue(amqp_url, bound_queue, expected=expected_events, timeout=30)
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.3) == []

    arrivals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    received_txs: set[str] = set()
    for message in messages:
        content: dict[str, Any] = json.loads(message.body)["resource"]["content"]
        tx = content["tx"]
        # Only committed transactions' events arrive.
        assert tx in committed, f"event of a rolled-back transaction arrived: {tx}"
        key, n = committed[tx]
        assert message.headers["outbox-key"] == key
        arrivals[key].append((n, content["index"]))
        received_txs.add(tx)

    # Every committed transaction's events arrived, exactly once each...
    assert received_txs == set(committed)
    assert len({m.properties["message_id"] for m in messages}) == len(messages)
    # ...and per key in commit order (then in publish order within a transaction).
    for key, order in arrivals.items():
        assert order == sorted(order), f"{key} arrived out of commit order: {order}"
        counts = [n for n, index in order if index == 0]
        assert counts == list(range(1, len(counts) + 1))
