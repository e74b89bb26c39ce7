"""What the broker does to one message stays with that message's key.

Against the real RabbitMQ: a body the broker refuses (406), unroutable rows
under both policies, nacks in the middle of a wave from a full queue, backoff
that grows, and transports that could never deliver.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import kombu
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import outbox
from outbox.errors import ConfigurationError
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.message import OutgoingMessage
from outbox.relay.observer import RelayObserver
from outbox.relay.publisher import NACKED, RETURNED, Publisher, Settled, open_publisher
from outbox.store import table
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url
from tests.ops_support import run_cli, versions_of

SCHEMA = "https://example.org/schemas/case.json"


def publish(engine: Engine, key_id: int, versions: range, *, action: str = "update") -> list[str]:
    with Session(engine) as session, session.begin():
        return [
            str(
                outbox.publish(
                    session,
                    outbox.Envelope(
                        action=action,
                        schema=SCHEMA,
                        content={"tenantId": 1, "id": key_id, "version": v, "pad": "x" * 200},
                    ),
                )
            )
            for v in versions
        ]


def states(engine: Engine) -> list[tuple[str, str]]:
    E = table.event
    with engine.connect() as connection:
        rows = connection.execute(select(E.c.event_id, E.c.state).order_by(E.c.position))
        return [(str(r.event_id), r.state) for r in rows]


def row_of(engine: Engine, event_id: str) -> Any:
    E = table.event
    with engine.connect() as connection:
        return connection.execute(select(E).where(E.c.event_id == uuid.UUID(event_id))).one()


@contextlib.contextmanager
def broker_max_message_size(limit: int) -> Iterator[None]:
    """RabbitMQ's max_message_size, for channels opened from now on; restored after."""

    def set_limit(value: int) -> None:
        subprocess.run(
            ["rabbitmqctl", "eval", f"application:set_env(rabbit, max_message_size, {value})."],
            check=True,
            capture_output=True,
            timeout=60,
        )

    before = subprocess.run(
        ["rabbitmqctl", "eval", "application:get_env(rabbit, max_message_size)."],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    previous = int(before.strip().strip("{}").split(",")[1])
    set_limit(limit)
    try:
        yield
    finally:
        set_limit(previous)


def test_a_body_the_broker_refuses_is_dead_and_holds_only_its_key(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    """The broker closes the channel over one message of a wave (406): that row goes dead.

    Before: the relay took the refusal for a lost connection and resent the
    same wave forever; no event of any key behind it was delivered.
    """
    before = [*publish(pg_engine, 1, range(1, 3)), *publish(pg_engine, 2, range(1, 3))]
    with Session(pg_engine) as session, session.begin():
        big = str(
            outbox.publish(
                session,
                outbox.Envelope(
                    action="update",
                    schema=SCHEMA,
                    content={"tenantId": 1, "id": 3, "version": 1, "blob": "b" * 100_000},
                ),
            )
        )
    held = publish(pg_engine, 3, range(2, 4))
    after = [*publish(pg_engine, 1, range(3, 5)), *publish(pg_engine, 4, range(1, 3))]
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(backoff_initial=0.01, backoff_max=0.05),
    )
    with broker_max_message_size(64 * 1024):
        relay.drain(timeout=30)
    # The refusal closed the channel: messages of the wave whose confirms it cut
    # off are sent again (at-least-once), with their ids.
    received = first_arrivals(drain_queue(amqp_url, bound_queue, expected=20, timeout=3))
    assert sorted(m.properties["message_id"] for m in received) == sorted(before + after)
    row = row_of(pg_engine, big)
    assert row.state == table.DEAD
    assert "larger than configured max size" in row.last_error
    assert [s for e, s in states(pg_engine) if e in held] == [table.PENDING] * 2
    by_key: dict[str, list[int]] = defaultdict(list)
    for message in received:
        by_key[message.headers["outbox-key"]].append(versions_of([message])[0])
    assert by_key == {"case:1:1": [1, 2, 3, 4], "case:1:2": [1, 2], "case:1:4": [1, 2]}


def first_arrivals(messages: list[Any]) -> list[Any]:
    seen: set[str] = set()
    first = []
    for message in messages:
        if message.properties["message_id"] not in seen:
            seen.add(message.properties["message_id"])
            first.append(message)
    return first


def test_a_body_over_the_relays_limit_is_dead_without_being_sent(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    with Session(pg_engine) as session, session.begin():
        content = {"tenantId": 1, "id": 1, "version": 1, "blob": "b" * 2000}
        big = str(
            outbox.publish(
                session, outbox.Envelope(action="update", schema=SCHEMA, content=content)
            )
        )
    others = publish(pg_engine, 2, range(1, 3))
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(max_payload_bytes=1000),
    )
    relay.drain(timeout=20)
    received = drain_queue(amqp_url, bound_queue, expected=2, timeout=10)
    assert [m.properties["message_id"] for m in received] == others
    row = row_of(pg_engine, big)
    assert row.state == table.DEAD and "max_payload_bytes" in row.last_error


def test_unroutable_dead_holds_the_key_and_dead_retry_restores_commit_order(
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    """Before: the updates behind the dead create were routed; after `dead retry` the key
    arrived as [u2, u3, c1, u2, u3]."""
    with kombu.Connection(amqp_url) as connection:
        channel = connection.default_channel
        channel.queue_unbind(bound_queue.name, exchange_name, "#")
        channel.queue_bind(bound_queue.name, exchange_name, "case.update")
    (create,) = publish(pg_engine, 1, range(1, 2), action="create")
    updates = publish(pg_engine, 1, range(2, 4))
    other = publish(pg_engine, 2, range(1, 3))
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(unroutable="dead"),
    )
    relay.drain(timeout=20)
    received = drain_queue(amqp_url, bound_queue, expected=3, timeout=3)
    assert [m.properties["message_id"] for m in received] == other
    assert row_of(pg_engine, create).state == table.DEAD
    assert [row_of(pg_engine, u).state for u in updates] == [table.PENDING] * 2

    with kombu.Connection(amqp_url) as connection:
        connection.default_channel.queue_bind(bound_queue.name, exchange_name, "case.create")
    args = ["dead", "retry", create, "--actor", "ops", "--reason", "queue bound"]
    assert run_cli([*args, "--database-url", pg_url(pg_database)]) == 0
    Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name)).drain(timeout=20)
    received = drain_queue(amqp_url, bound_queue, expected=4, timeout=5)
    assert [m.properties["message_id"] for m in received] == [create, *updates]


class FailureClock(RelayObserver):
    def __init__(self) -> None:
        self.failures: list[tuple[float, str]] = []
        self.disconnects: list[float] = []

    def publish_failed(self, kind: str, count: int) -> None:
        self.failures.append((time.monotonic(), kind))

    def broker_connected(self, connected: bool) -> None:
        if not connected:
            self.disconnects.append(time.monotonic())


def _gaps(moments: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in itertools.pairwise(moments)]


def run_for(relay: Relay, seconds: float, caplog: pytest.LogCaptureFixture, level: str) -> None:
    """``relay.run`` in a thread for ``seconds``, its records at ``level`` captured."""
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    with caplog.at_level(level, logger="outbox"):
        thread.start()
        time.sleep(seconds)
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "the relay did not stop"


def test_unroutable_retries_back_off_and_log_once(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the delay was reset after every attempt (~5 retries a second, a warning each)."""
    publish(pg_engine, 1, range(1, 3))
    clock = FailureClock()
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(poll_interval=0.01, backoff_initial=0.05, backoff_max=0.4),
        observers=[clock],
    )
    run_for(relay, 2.5, caplog, "INFO")
    moments = [t for t, kind in clock.failures if kind == RETURNED]
    gaps = _gaps(moments)
    # 0.05, 0.1, 0.2, 0.4, 0.4, ...: about 8 attempts in 2.5 s, not 50.
    assert 4 <= len(moments) <= 10, gaps
    assert gaps[0] < 0.2 and all(g >= 0.3 for g in gaps[3:]), gaps
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings if "routing key" in r.getMessage()] == [
        "no queue is bound for routing key 'case.update': event "
        f"{relay_first_id(pg_engine)} and the rest of key case:1:1 wait, retried with backoff"
    ]


def relay_first_id(engine: Engine) -> str:
    return states(engine)[0][0]


@pytest.mark.parametrize("work", [1, 0], ids=["with-work", "idle"])
def test_an_unreachable_broker_is_retried_with_growing_delays(
    work: int, pg_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle: before, a relay with nothing to send never connected, and said nothing."""
    from tests.ops_support import closed_port_url

    publish(pg_engine, 1, range(1, 1 + work))
    clock = FailureClock()
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(closed_port_url(), "outbox"),
        RelaySettings(poll_interval=0.01, backoff_initial=0.05, backoff_max=0.4),
        observers=[clock],
    )
    run_for(relay, 2.5, caplog, "DEBUG")
    gaps = _gaps(clock.disconnects)
    assert 4 <= len(clock.disconnects) <= 10, gaps
    assert all(g >= 0.3 for g in gaps[3:]), gaps
    unavailable = [r for r in caplog.records if "broker_unavailable" in str(r.__dict__)]
    assert [r.levelname for r in unavailable][:2] == ["WARNING", "DEBUG"]
    assert [r.levelname for r in unavailable].count("WARNING") == 1
    assert [state for _, state in states(pg_engine)] == [table.PENDING] * work


@pytest.fixture
def bounded_queue(amqp_url: str, exchange_name: str) -> Iterator[str]:
    """A queue that holds 5 messages and nacks publishes beyond that (reject-publish)."""
    name = f"{exchange_name}-bounded"
    with kombu.Connection(amqp_url) as connection:
        channel = connection.default_channel
        channel.exchange_declare(exchange_name, "topic", durable=True, auto_delete=False)
        channel.queue_declare(
            name,
            durable=True,
            auto_delete=False,
            arguments={"x-max-length": 5, "x-overflow": "reject-publish"},
        )
        channel.queue_bind(name, exchange_name, "#")
    yield name
    with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
        connection.default_channel.queue_delete(name)


class VerdictLog:
    """The AMQP publisher, recording for each verdict when its message was sent."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.sends = 0
        self.sent_as: dict[int, int] = {}  # position -> the number of its latest send
        # (send number, "ok" or a failure kind, how many had been sent by then)
        self.verdicts: list[tuple[int, str, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        for message in messages:
            self.sends += 1
            self.sent_as[message.position] = self.sends
        self.inner.send(messages)

    def settle(self, timeout: float = 0.0) -> Settled:
        settled = self.inner.settle(timeout)
        for message in settled.confirmed:
            self.verdicts.append((self.sent_as[message.position], "ok", self.sends))
        for failure in settled.failed:
            self.verdicts.append((self.sent_as[failure.message.position], failure.kind, self.sends))
        return settled

    def nacks_in_mid_window(self) -> int:
        """Nacks of a message that had others sent after it, on the wire behind it."""
        return sum(1 for sent, kind, by_then in self.verdicts if kind == NACKED and by_then > sent)

    def confirms_after_a_nack(self) -> int:
        """Confirms of a message sent after one that was nacked, in the same window."""
        nacked = [sent for sent, kind, _ in self.verdicts if kind == NACKED]
        confirmed = [sent for sent, kind, _ in self.verdicts if kind == "ok"]
        return sum(1 for c in confirmed if any(n < c for n in nacked))


def test_nacks_in_mid_wave_keep_first_arrivals_of_every_key_in_commit_order(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bounded_queue: str
) -> None:
    """A full queue nacks some messages of a wave and takes later ones as a consumer frees room.

    Before: a batch carried several events of one key; a nacked early one was
    resent after later ones of its key had been enqueued (first arrivals out of
    order, as in a quorum queue's leader election).
    """
    committed: dict[str, list[str]] = {}
    for key_id in range(12):
        committed[f"case:1:{key_id}"] = []
    for round_ in range(8):  # interleaved commits: each batch holds several events per key
        for key_id in range(12):
            committed[f"case:1:{key_id}"] += publish(pg_engine, key_id, range(round_, round_ + 1))
    total = sum(map(len, committed.values()))
    clock = FailureClock()
    verdicts = VerdictLog(open_publisher(amqp_url, exchange_name))
    relay = Relay(
        SqlStore(pg_engine),
        verdicts,
        RelaySettings(poll_interval=0.01, backoff_initial=0.01, backoff_max=0.02),
        observers=[clock],
    )
    arrivals: list[tuple[str, str]] = []
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        with kombu.Connection(amqp_url) as connection:
            channel = connection.channel()
            while len({m for _, m in arrivals}) < total and time.monotonic() < deadline:
                message = channel.basic_get(bounded_queue, no_ack=True)
                if message is None:
                    time.sleep(0.003)
                    continue
                arrivals.append((message.headers["outbox-key"], message.properties["message_id"]))
                time.sleep(0.002)  # a slow consumer: the queue stays near full
    finally:
        stop.set()
        thread.join(15)
    assert sum(1 for _, kind in clock.failures if kind == NACKED) >= 3, "the broker never nacked"
    # In the middle of the window: nacked messages had others sent behind them,
    # and messages sent after a nacked one were confirmed.
    assert verdicts.nacks_in_mid_window() >= 1
    assert verdicts.confirms_after_a_nack() >= 1
    first_seen: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for key, message_id in arrivals:
        if message_id not in seen:
            seen.add(message_id)
            first_seen[key].append(message_id)
    assert dict(first_seen) == committed
    assert {s for _, s in states(pg_engine)} == {table.DELIVERED}


def test_in_process_transports_are_refused_for_the_relay(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: with memory:// every row was marked delivered and nothing left the process."""
    with pytest.raises(ConfigurationError, match="in-process"):
        open_publisher("memory://", "outbox")
    code = run_cli(["relay", "--database-url", pg_url(pg_database), "--broker-url", "memory://"])
    assert code != 0
    assert "in-process" in capsys.readouterr().err
    # The demo's filesystem transport delivers across processes and stays allowed.
    assert open_publisher("filesystem://", "outbox", transport_options={}) is not None


def test_body_is_the_stored_envelope(pg_engine: Engine, amqp_url: str, exchange_name: str) -> None:
    """The refusal path never alters what is sent: the body is the stored JSON."""
    (event_id,) = publish(pg_engine, 9, range(1, 2))
    queue = kombu.Queue(
        f"{exchange_name}-body",
        exchange=kombu.Exchange(exchange_name, type="topic", durable=True),
        routing_key="#",
    )
    with kombu.Connection(amqp_url) as connection:
        queue(connection.default_channel).declare()
    try:
        Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name)).drain(timeout=10)
        (message,) = drain_queue(amqp_url, queue, expected=1, timeout=5)
    finally:
        with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
            queue(connection.default_channel).delete()
    assert message.properties["message_id"] == event_id
    assert json.loads(message.body)["resource"]["content"]["version"] == 1


def test_max_attempts_marks_a_nacked_event_dead_and_holds_its_key(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bounded_queue: str
) -> None:
    """A queue that stays full nacks every publish: the third nack makes the event dead."""
    with kombu.Connection(amqp_url) as connection:  # fill the queue: no consumer frees room
        producer = connection.Producer()
        for i in range(5):
            producer.publish(f"filler {i}", exchange=exchange_name, routing_key="filler")
    first, second = publish(pg_engine, 1, range(1, 3))
    clock = FailureClock()
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(max_attempts=3, backoff_initial=0.01, backoff_max=0.02),
        observers=[clock],
    )
    relay.drain(timeout=20)
    dead = row_of(pg_engine, first)
    assert dead.state == table.DEAD
    assert dead.last_error.startswith("nacked 3 times (max_attempts)"), dead.last_error
    assert row_of(pg_engine, second).state == table.PENDING  # held behind it, never sent
    assert [kind for _, kind in clock.failures] == [NACKED] * 3


def test_max_attempts_ends_the_retries_of_an_unroutable_event(
    pg_engine: Engine, amqp_url: str, exchange_name: str
) -> None:
    """--unroutable retry with max_attempts: returned twice, then dead (no queue is bound)."""
    (event,) = publish(pg_engine, 1, range(1, 2))
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(max_attempts=2, backoff_initial=0.01, backoff_max=0.02, poll_interval=0.01),
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while row_of(pg_engine, event).state != table.DEAD and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    row = row_of(pg_engine, event)
    assert row.state == table.DEAD
    assert row.last_error.startswith("unroutable 2 times (max_attempts)"), row.last_error
    assert row.attempts == 2  # both returns are counted in the row (mark_dead counts the last)
