"""The relay through kombu's Redis transport, against a real Redis server.

Redis has no broker confirms (docs/guarantees.md, "Other kombu transports"):
a message counts as sent once kombu's LPUSH returned. These tests prove what
the relay still promises there: every committed event arrives, events sharing
a key arrive in commit order (first arrivals), and a relay that stops or dies
mid-stream is replaced without a loss, its resent messages carrying their
original message ids. They also show the weaker part: with no queue bound to
the exchange, kombu drops the message and the row is marked delivered.

Commit order is recorded as in tests/integration/relay/test_ordering.py: after writing its
events, each producer transaction increments a per-key counter row, whose lock
it holds until commit, so one key's counter values are in commit order.

The tests use Redis database 13 (``OUTBOX_TEST_REDIS_URL``) and flush only it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import outbox
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.message import OutgoingMessage
from outbox.relay.publisher import KombuPublisher, open_publisher
from outbox.store.sqlstore import SqlStore
from tests.conftest import _unavailable, drain_queue
from tests.integration.relay.test_ordering import count_commit, setup_commit_log

REDIS_URL = os.environ.get("OUTBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
SCHEMA = "https://example.org/schemas/case.json"
KEYS = [f"case:1:{n}" for n in range(4)]
WRITERS = 4
TRANSACTIONS_PER_WRITER = 15
# Short, so that a relay taking over from a dead one waits seconds, not 15.
SETTINGS = RelaySettings(batch_size=5, poll_interval=0.02, lease_ttl=2.0)


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    client.flushdb()  # this database only
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def exchange() -> kombu.Exchange:
    return kombu.Exchange(f"outbox-test-{uuid.uuid4().hex[:10]}", type="topic", durable=True)


@pytest.fixture
def redis_queue(redis_url: str, exchange: kombu.Exchange) -> kombu.Queue:
    """A queue bound to every routing key of the exchange (kombu keeps the binding in Redis)."""
    queue = kombu.Queue(f"{exchange.name}-all", exchange=exchange, routing_key="#")
    with kombu.Connection(redis_url) as connection:
        queue(connection.default_channel).declare()
    return queue


# -- producers ------------------------------------------------------------------


def _write(engine: Engine, key: str, rng: random.Random) -> None:
    """One producer transaction: one or two events of ``key``, a delay, the count, a commit."""
    tx = uuid.uuid4()
    case_id = int(key.rsplit(":", 1)[1])
    with Session(engine) as session, session.begin():
        for index in range(rng.choice([1, 1, 2])):
            content = {"tenantId": 1, "id": case_id, "tx": str(tx), "index": index}
            outbox.publish(
                session, outbox.Envelope(action="update", schema=SCHEMA, content=content)
            )
        outbox.flush_events(session)  # the rows have their positions; the commit comes later
        time.sleep(rng.uniform(0, 0.01))
        count_commit(session.connection(), key, tx)


def _producers(engine: Engine, failures: list[BaseException]) -> list[threading.Thread]:
    """Writers committing concurrently, each on random keys; started, not joined."""

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(TRANSACTIONS_PER_WRITER):
                _write(engine, rng.choice(KEYS), rng)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(WRITERS)]
    for thread in threads:
        thread.start()
    return threads


def _committed(engine: Engine) -> dict[str, tuple[str, int]]:
    """tx -> (key, commit number within the key)."""
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT tx, key, n FROM commit_log"))
        return {str(tx): (key, n) for tx, key, n in rows}


def _event_ids(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return {str(i) for (i,) in connection.execute(text("SELECT event_id FROM outbox_event"))}


def _wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the relay and a consumer -----------------------------------------------------


class Relaying:
    """A relay running in a thread until :meth:`stop` (or until it raises)."""

    def __init__(self, engine: Engine, publisher: Any) -> None:
        self.relay = Relay(SqlStore(engine), publisher, SETTINGS)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.relay.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the relay did not stop"


class Consumer:
    """A kombu consumer on Redis (BRPOP), collecting every message until :meth:`stop`."""

    def __init__(self, url: str, queue: kombu.Queue) -> None:
        self.messages: list[Any] = []
        self._done = threading.Event()
        self._url, self._queue = url, queue
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _receive(self, message: Any) -> None:
        self.messages.append(message)
        message.ack()

    def _run(self) -> None:
        try:
            with (
                kombu.Connection(self._url) as connection,
                connection.Consumer(self._queue, on_message=self._receive),
            ):
                while True:
                    try:
                        connection.drain_events(timeout=0.2)
                    except TimeoutError:
                        if self._done.is_set():
                            return  # asked to stop, and the queue is empty
        except BaseException as exc:
            self.error = exc

    def stop(self) -> list[Any]:
        self._done.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the consumer did not stop"
        assert self.error is None, self.error
        return self.messages


def _first_arrivals_in_commit_order(
    messages: list[Any], committed: dict[str, tuple[str, int]]
) -> None:
    arrivals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    seen: set[str] = set()
    for message in messages:
        message_id = message.properties["message_id"]
        if message_id in seen:
            continue
        seen.add(message_id)
        content = json.loads(message.body)["resource"]["content"]
        key, n = committed[content["tx"]]
        assert message.headers["outbox-key"] == key
        arrivals[key].append((n, content["index"]))
    assert set(arrivals) == set(KEYS)
    for key, order in arrivals.items():
        assert order == sorted(order), f"{key} arrived out of commit order: {order}"
        counts = [n for n, index in order if index == 0]
        assert counts == list(range(1, len(counts) + 1)), f"{key}: a transaction is missing"


# -- tests --------------------------------------------------------------------------


def test_concurrent_producers_arrive_in_commit_order_through_redis(
    pg_engine: Engine, redis_url: str, exchange: kombu.Exchange, redis_queue: kombu.Queue
) -> None:
    setup_commit_log(pg_engine, KEYS)
    publisher = open_publisher(redis_url, exchange.name)
    assert isinstance(publisher, KombuPublisher)
    consumer = Consumer(redis_url, redis_queue)
    relay = Relaying(pg_engine, publisher)
    failures: list[BaseException] = []
    try:
        for thread in _producers(pg_engine, failures):
            thread.join(timeout=60)
        assert not failures, failures
        store = SqlStore(pg_engine)
        _wait_until(lambda: store.counts()["pending"] == 0, 30, "the relay to deliver all")
    finally:
        relay.stop()
    assert relay.error is None, relay.error
    messages = consumer.stop()

    ids = _event_ids(pg_engine)
    assert len(ids) >= WRITERS * TRANSACTIONS_PER_WRITER
    assert sorted(m.properties["message_id"] for m in messages) == sorted(ids)  # each once
    _first_arrivals_in_commit_order(messages, _committed(pg_engine))


class Crash(BaseException):
    """The relay process dying (SIGKILL): nothing after it runs, nothing is marked."""


class CrashingPublisher:
    """The Redis publisher, until the relay dies right after the ``sends``-th send
    reached Redis, before the rows were marked delivered."""

    def __init__(self, inner: KombuPublisher, sends: int) -> None:
        self._inner, self._left = inner, sends
        self.crashed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def settle(self, timeout: float = 0.0) -> Any:
        if self.crashed:
            raise Crash  # a dead process does no shutdown either
        settled = self._inner.settle(timeout)
        if settled.confirmed:
            self._left -= 1
            if self._left <= 0:
                self.crashed = True
                raise Crash
        return settled


def test_a_relay_stopped_or_killed_mid_stream_loses_nothing_through_redis(
    pg_engine: Engine, redis_url: str, exchange: kombu.Exchange, redis_queue: kombu.Queue
) -> None:
    setup_commit_log(pg_engine, KEYS)
    consumer = Consumer(redis_url, redis_queue)
    store = SqlStore(pg_engine)
    failures: list[BaseException] = []
    producers = _producers(pg_engine, failures)

    def delivered() -> int:
        return int(store.counts()["delivered"])

    # First relay: stopped cleanly mid-stream, while the producers still write.
    first = Relaying(pg_engine, open_publisher(redis_url, exchange.name))
    _wait_until(lambda: delivered() >= 10, 30, "the first relay to deliver 10")
    first.stop()
    assert first.error is None, first.error
    # Second relay: dies right after a send reached Redis, before marking it.
    crashing = CrashingPublisher(open_publisher(redis_url, exchange.name), sends=3)
    second = Relaying(pg_engine, crashing)
    second.thread.join(timeout=30)
    assert isinstance(second.error, Crash), second.error
    # Third relay: takes over once the dead one's leases expired, and finishes.
    third = Relaying(pg_engine, open_publisher(redis_url, exchange.name))
    try:
        for thread in producers:
            thread.join(timeout=60)
        assert not failures, failures
        _wait_until(lambda: store.counts()["pending"] == 0, 30, "the third relay to finish")
    finally:
        third.stop()
    assert third.error is None, third.error
    messages = consumer.stop()

    ids = _event_ids(pg_engine)
    received = [m.properties["message_id"] for m in messages]
    assert set(received) == ids  # at least once: nothing lost, nothing foreign
    duplicates = len(received) - len(set(received))
    assert duplicates > 0, "the killed relay's last wave was not resent"
    # A resent message is the original: same id, same body.
    bodies: dict[str, bytes] = {}
    for message in messages:
        assert bodies.setdefault(message.properties["message_id"], message.body) == message.body
    _first_arrivals_in_commit_order(messages, _committed(pg_engine))


def test_without_a_bound_queue_redis_drops_the_message_yet_the_row_is_delivered(
    pg_engine: Engine, redis_url: str, exchange: kombu.Exchange
) -> None:
    """What docs/guarantees.md says of Redis: no "unroutable" return as RabbitMQ's."""
    with Session(pg_engine) as session, session.begin():
        content = {"tenantId": 1, "id": 1, "version": 1}
        outbox.publish(session, outbox.Envelope(action="update", schema=SCHEMA, content=content))
    relay = Relay(SqlStore(pg_engine), open_publisher(redis_url, exchange.name), SETTINGS)
    assert relay.drain(timeout=30) == 1
    assert SqlStore(pg_engine).counts()["delivered"] == 1
    # Nothing was stored in Redis, and a queue bound afterwards finds nothing.
    with redis.Redis.from_url(redis_url) as client:
        assert client.keys("*") == []
    late = kombu.Queue(f"{exchange.name}-late", exchange=exchange, routing_key="#")
    with kombu.Connection(redis_url) as connection:
        bound = late(connection.default_channel)
        bound.declare()
        assert bound.get(no_ack=True) is None


def test_the_kombu_publisher_sends_to_each_rows_exchange(
    redis_url: str, exchange: kombu.Exchange, redis_queue: kombu.Queue
) -> None:
    other = kombu.Queue(
        f"{exchange.name}-other",
        exchange=kombu.Exchange(f"{exchange.name}.other", type="topic", durable=True),
        routing_key="#",
    )
    with kombu.Connection(redis_url) as connection:
        other(connection.default_channel).declare()
    publisher = KombuPublisher(redis_url, exchange.name)
    messages = [
        OutgoingMessage(
            position=n,
            message_id=f"m{n}",
            routing_key="case.update",
            body=b"{}",
            content_type="application/json",
            timestamp=dt.datetime.now(dt.UTC),
            headers={},
            exchange=row_exchange,
        )
        for n, row_exchange in enumerate([f"{exchange.name}.other", None, f"{exchange.name}.other"])
    ]
    try:
        publisher.send(messages)
        settled = publisher.settle()
        assert settled.failed == []
        assert settled.confirmed == messages
    finally:
        publisher.close()
    for queue, expected in ((other, ["m0", "m2"]), (redis_queue, ["m1"])):
        arrived = drain_queue(redis_url, queue, expected=len(expected))
        assert [m.properties["message_id"] for m in arrived] == expected
