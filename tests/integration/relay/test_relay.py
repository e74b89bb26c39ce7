"""The relay against real PostgreSQL and RabbitMQ: message properties and CloudEvents
headers, dead rows that hold only their key, unroutable messages, and partition
ownership shared by two relays."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import kombu
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

import outbox
from outbox.envelope import ordering, validation
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.message import OutgoingMessage
from outbox.relay.publisher import Publisher, Settled, open_publisher
from outbox.store import table
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue
from tests.ops_support import insert_invalid_row

SCHEMA = "https://example.org/schemas/case.json"


def publish_cases(
    engine: Engine, *contents: dict[str, Any], action: str = "update"
) -> list[uuid.UUID]:
    with Session(engine) as session, session.begin():
        return [
            outbox.publish(session, outbox.Envelope(action=action, schema=SCHEMA, content=c))
            for c in contents
        ]


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running(relay: Relay) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "relay did not stop"


def event_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(table.event).order_by(table.event.c.position)))


def test_message_properties_headers_and_cloudevents(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    (event_id,) = publish_cases(
        pg_engine, {"tenantId": 1, "id": 42, "title": "New case"}, action="create"
    )
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    assert relay.drain(timeout=20) == 1

    (message,) = drain_queue(amqp_url, bound_queue, expected=1)
    (row,) = event_rows(pg_engine)
    assert row.state == table.DELIVERED and row.delivered_at is not None

    assert message.delivery_info["routing_key"] == "case.create"
    assert message.delivery_info["exchange"] == exchange_name
    assert message.properties["delivery_mode"] == 2  # persistent
    assert message.content_type == "application/json"
    assert message.properties["message_id"] == str(event_id)
    sent_at = message.properties["timestamp"]
    created = row.created_at.timestamp()
    assert abs(sent_at - created) < 1.5
    assert json.loads(message.body) == {
        "action": "create",
        "resource": {"schema": SCHEMA, "content": {"tenantId": 1, "id": 42, "title": "New case"}},
    }
    headers = message.headers
    assert headers["outbox-action"] == "create"
    assert headers["outbox-schema"] == SCHEMA
    assert headers["outbox-key"] == "case:1:42"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-id"] == str(event_id)
    # The type starts with the schema host's reverse-DNS name; the data schema is the
    # body's (the envelope's), the content's schema is outbox-schema.
    assert headers["ce-type"] == "org.example.case.create"
    assert headers["ce-dataschema"] == validation.event_schema()["$id"]
    assert headers["ce-source"]

    # The official CloudEvents SDK reads our message in binary content mode.
    event = from_binary(
        RabbitMQMessage(
            headers={k: str(v) for k, v in headers.items()},
            content_type=message.content_type,
            body=message.body,
        ),
        JSONFormat(),
    )
    assert event.get_id() == message.properties["message_id"]
    assert event.get_dataschema() == validation.event_schema()["$id"]
    assert event.get_type() == "org.example.case.create"
    assert event.get_extension("outboxschema") is None  # our headers are not ce- extensions
    assert event.get_time() == dt.datetime.fromisoformat(headers["ce-time"].replace("Z", "+00:00"))
    assert event.get_data() == json.loads(message.body)


def test_invalid_row_is_dead_holds_its_key_and_other_keys_flow(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    publish_cases(pg_engine, {"tenantId": 1, "id": 1, "v": 1})
    # Written by other code, bypassing publish: the relay validates again.
    bad = insert_invalid_row(
        pg_engine, "case:1:1", json.dumps({"action": "upsert", "resource": {"schema": SCHEMA}})
    )
    publish_cases(pg_engine, {"tenantId": 1, "id": 1, "v": 2}, {"tenantId": 1, "id": 2, "v": 1})
    publish_cases(pg_engine, {"tenantId": 1, "id": 1, "v": 3}, {"tenantId": 1, "id": 2, "v": 2})

    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    relay.drain(timeout=20)
    received = drain_queue(amqp_url, bound_queue, expected=3, timeout=10)
    assert [
        (
            json.loads(m.body)["resource"]["content"]["id"],
            json.loads(m.body)["resource"]["content"]["v"],
        )
        for m in received
    ] == [
        (1, 1),
        (2, 1),
        (2, 2),
    ]
    dead = {r.event_id: r for r in event_rows(pg_engine) if r.state == table.DEAD}
    assert list(dead) == [bad]
    assert "action" in dead[bad].last_error and "upsert" in dead[bad].last_error
    counts = SqlStore(pg_engine).counts()
    assert (counts["pending"], counts["dead"], counts["held_keys"]) == (2, 1, 1)

    # Resolving it as the guarantees page says (skip it) releases the key, in order.
    with pg_engine.begin() as connection:
        connection.execute(
            update(table.event).where(table.event.c.event_id == bad).values(state=table.SKIPPED)
        )
    assert relay.drain(timeout=20) == 2
    later = drain_queue(amqp_url, bound_queue, expected=2, timeout=10)
    assert [json.loads(m.body)["resource"]["content"]["v"] for m in later] == [2, 3]


def test_invalid_json_row_is_dead_too(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    bad = insert_invalid_row(pg_engine, "case:1:5", "{not json")
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    assert relay.drain(timeout=20) == 0
    (row,) = event_rows(pg_engine)
    assert (row.event_id, row.state) == (bad, table.DEAD)
    assert "JSON" in row.last_error


def test_unroutable_with_retry_keeps_rows_pending_until_a_queue_is_bound(
    pg_engine: Engine, amqp_url: str, exchange_name: str
) -> None:
    ids = publish_cases(pg_engine, *({"tenantId": 1, "id": 3, "v": v} for v in range(1, 6)))
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(unroutable="retry", poll_interval=0.05, backoff_max=0.3),
    )
    queue = kombu.Queue(
        f"{exchange_name}-late",
        exchange=kombu.Exchange(exchange_name, type="topic", durable=True),
        routing_key="case.#",
        durable=True,
        auto_delete=False,
    )
    with running(relay):
        wait_for(
            lambda: event_rows(pg_engine)[0].attempts >= 2, what="a retried unroutable message"
        )
        rows = event_rows(pg_engine)
        assert {r.state for r in rows} == {table.PENDING}
        assert "unroutable" in rows[0].last_error
        with kombu.Connection(amqp_url) as connection:
            queue(connection.default_channel).declare()
        try:
            wait_for(lambda: SqlStore(pg_engine).counts()["pending"] == 0, what="delivery")
            received = drain_queue(amqp_url, queue, expected=5, timeout=10)
        finally:
            with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
                queue(connection.default_channel).delete()
    assert [m.properties["message_id"] for m in received] == [str(i) for i in ids]


def test_unroutable_retry_holds_its_key_and_resends_only_the_unroutable_message(
    pg_engine: Engine, amqp_url: str, exchange_name: str
) -> None:
    """Nothing later of the key is sent while its head is unroutable; other keys go on.

    Sending the updates behind the unroutable create would make them arrive
    before it: first arrivals out of commit order once a queue is bound.
    """
    (create_id,) = publish_cases(pg_engine, {"tenantId": 1, "id": 4}, action="create")
    update_ids = publish_cases(pg_engine, *({"tenantId": 1, "id": 4, "v": v} for v in range(3)))
    (other_id,) = publish_cases(pg_engine, {"tenantId": 1, "id": 5, "v": 0})
    exchange = kombu.Exchange(exchange_name, type="topic", durable=True)
    updates = kombu.Queue(f"{exchange_name}-updates", exchange=exchange, routing_key="case.update")
    creates = kombu.Queue(f"{exchange_name}-creates", exchange=exchange, routing_key="case.create")
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(unroutable="retry", poll_interval=0.05, backoff_max=0.1),
    )
    with kombu.Connection(amqp_url) as connection:
        updates(connection.default_channel).declare()
    try:
        with running(relay):
            wait_for(
                lambda: event_rows(pg_engine)[0].attempts >= 4, what="several unroutable retries"
            )
            # Only the other key's update went through; the held key sent nothing more.
            first_pass = drain_queue(amqp_url, updates, expected=2, timeout=1)
            with kombu.Connection(amqp_url) as connection:
                creates(connection.default_channel).declare()
            wait_for(lambda: SqlStore(pg_engine).counts()["pending"] == 0, what="delivery")
        after_bind = drain_queue(amqp_url, updates, expected=4, timeout=5)
        created = drain_queue(amqp_url, creates, expected=1, timeout=5)
    finally:
        with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
            updates(connection.default_channel).delete()
            creates(connection.default_channel).delete()
    assert [m.properties["message_id"] for m in first_pass] == [str(other_id)]
    assert [m.properties["message_id"] for m in created] == [str(create_id)]
    # Once the create went through, its key's updates were sent once each, in order.
    assert [m.properties["message_id"] for m in after_bind] == [str(i) for i in update_ids]


def test_unroutable_with_dead_policy_marks_dead_and_holds_only_that_key(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    # The test queue is bound to case.* only; tickets have no queue.
    with kombu.Connection(amqp_url) as connection:
        channel = connection.default_channel
        channel.queue_unbind(bound_queue.name, exchange_name, "#")
        channel.queue_bind(bound_queue.name, exchange_name, "case.#")
    with Session(pg_engine) as session, session.begin():
        for v in (1, 2):
            outbox.publish(
                session,
                outbox.Envelope(action="update", schema=SCHEMA, content={"tenantId": 1, "id": 9}),
                resource_type="ticket",
                key="ticket-9",
            )
            outbox.publish(
                session,
                outbox.Envelope(
                    action="update", schema=SCHEMA, content={"tenantId": 1, "id": 8, "v": v}
                ),
            )
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(unroutable="dead"),
    )
    relay.drain(timeout=20)
    received = drain_queue(amqp_url, bound_queue, expected=2, timeout=10)
    assert [json.loads(m.body)["resource"]["content"]["v"] for m in received] == [1, 2]
    states = [(r.ordering_key, r.state) for r in event_rows(pg_engine)]
    assert states == [
        ("ticket-9", table.DEAD),
        ("case:1:8", table.DELIVERED),
        ("ticket-9", table.PENDING),  # held behind its dead predecessor
        ("case:1:8", table.DELIVERED),
    ]


class RecordingPublisher:
    """A real publisher that also remembers which partitions it sent (to tell relays apart)."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.partitions: set[int] = set()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def connect(self) -> None:
        self.inner.connect()

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]:
        return self.inner.prepare(messages)

    def keepalive(self) -> None:
        self.inner.keepalive()

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        for message in messages:
            key = str(message.headers["outbox-key"])
            self.partitions.add(ordering.partition_of(key, table.DEFAULT_PARTITIONS))
        self.inner.send(messages)

    def settle(self, timeout: float = 0.0) -> Settled:
        return self.inner.settle(timeout)

    def abort(self, kind: str, detail: str) -> None:
        self.inner.abort(kind, detail)

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def confirm_clock(self, sent_at: float) -> float | None:
        return self.inner.confirm_clock(sent_at)

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight

    @property
    def unsettled_news(self) -> bool:
        return self.inner.unsettled_news

    def close(self) -> None:
        self.inner.close()


class VanishingStore(SqlStore):
    """A store whose relay dies without a clean shutdown: it never releases its leases."""

    def release(self, relay_id: str) -> None:
        pass


def test_two_relays_share_partitions_and_one_takes_over(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    settings = RelaySettings(lease_ttl=3.0, poll_interval=0.05, batch_size=50)
    first_publisher = RecordingPublisher(open_publisher(amqp_url, exchange_name))
    second_publisher = RecordingPublisher(open_publisher(amqp_url, exchange_name))
    first = Relay(VanishingStore(pg_engine), first_publisher, settings, relay_id="first")
    second = Relay(SqlStore(pg_engine), second_publisher, settings, relay_id="second")
    everything = set(range(table.DEFAULT_PARTITIONS))
    keys = [f"case:1:{n}" for n in range(64)]

    def owners() -> dict[int, str | None]:
        return {p["partition"]: p["owner"] for p in SqlStore(pg_engine).partitions()}

    with running(first) as stop_first, running(second):
        wait_for(
            lambda: sorted(map(str, owners().values())) == ["first"] * 8 + ["second"] * 8,
            what="an even split of partitions",
        )
        split = owners()
        for v in (1, 2):
            publish_cases(pg_engine, *({"tenantId": 1, "id": n, "v": v} for n in range(64)))
        wait_for(lambda: SqlStore(pg_engine).counts()["pending"] == 0, what="delivery")
        # Each partition was published by exactly the relay that owns it.
        assert first_publisher.partitions == {p for p, o in split.items() if o == "first"}
        assert second_publisher.partitions == {p for p, o in split.items() if o == "second"}
        assert first_publisher.partitions | second_publisher.partitions == everything

        # The first relay dies without letting go: its leases expire, the second takes all.
        stop_first.set()
        second_publisher.partitions.clear()
        wait_for(lambda: set(owners().values()) == {"second"}, timeout=10, what="the takeover")
        publish_cases(pg_engine, *({"tenantId": 1, "id": n, "v": 3} for n in range(64)))
        wait_for(lambda: SqlStore(pg_engine).counts()["pending"] == 0, what="delivery")
        assert second_publisher.partitions == {
            ordering.partition_of(k, table.DEFAULT_PARTITIONS) for k in keys
        }

    messages = drain_queue(amqp_url, bound_queue, expected=3 * 64, timeout=20)
    assert len(messages) == 3 * 64
    by_key: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        by_key[m.headers["outbox-key"]].append(json.loads(m.body)["resource"]["content"]["v"])
    assert by_key == {k: [1, 2, 3] for k in keys}
