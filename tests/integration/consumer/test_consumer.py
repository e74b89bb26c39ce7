"""The consumer toolkit against real PostgreSQL and RabbitMQ: decoding JSON and Avro
bodies, validation, and an idempotent consumer surviving a redelivery."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
from sqlalchemy import Column, Connection, Engine, Integer, MetaData, Table, Text, func, select
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox.consumer import (
    IdempotentConsumer,
    ReceivedEvent,
    claim,
    create_inbox_table,
    decode,
    decode_message,
)
from outbox.errors import ContentValidationError, EnvelopeError, SchemaNotMigrated
from outbox.relay.loop import Relay
from outbox.relay.publisher import open_publisher
from outbox.schemas.registry import SchemaRegistry, relay_hooks
from outbox.store import migrate, table
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url

CASE_URI = "https://example.org/schemas/case"
CASE_SCHEMA: dict[str, Any] = {
    "$id": CASE_URI,
    "type": "object",
    "required": ["tenantId", "id"],
    "properties": {
        "tenantId": {"type": "integer"},
        "id": {"type": "integer"},
        "title": {"type": "string"},
        "version": {"type": "integer"},
    },
}
NOTE_URI = "https://example.org/schemas/note"
NOTE_V1: dict[str, Any] = {
    "type": "record",
    "name": "Note",
    "namespace": "org.example",
    "fields": [
        {"name": "tenantId", "type": "long"},
        {"name": "id", "type": "long"},
        {"name": "text", "type": "string"},
        {"name": "pinned", "type": "boolean"},
    ],
}
# What a consumer built against a later version reads the same bytes as.
NOTE_V2: dict[str, Any] = {
    **NOTE_V1,
    "fields": [
        *NOTE_V1["fields"],
        {"name": "colour", "type": "string", "default": "yellow"},
    ],
}


def produce(engine: Engine, registry: SchemaRegistry, *envelopes: outbox.Envelope) -> None:
    sessions = sessionmaker(engine)
    outbox.configure(sessions, outbox.ProducerOptions(schemas=registry))
    with sessions() as session, session.begin():
        for envelope in envelopes:
            outbox.publish(session, envelope)


def relay_all(engine: Engine, amqp_url: str, exchange: str, expected: int, **hooks: Any) -> None:
    relay = Relay(SqlStore(engine), open_publisher(amqp_url, exchange), **hooks)
    assert relay.drain(timeout=30) == expected


def test_json_message_decodes_to_a_typed_event(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    registry = SchemaRegistry(pg_engine)
    registry.register(CASE_URI, CASE_SCHEMA)
    produce(
        pg_engine,
        registry,
        outbox.Envelope(
            action="create", schema=CASE_URI, content={"tenantId": 1, "id": 7, "title": "t"}
        ),
        outbox.Envelope(
            action="delete",
            schema=CASE_URI,
            content=outbox.ResourceReference(tenant_id=1, id=7, version=3),
        ),
    )
    relay_all(pg_engine, amqp_url, exchange_name, 2, **relay_hooks(pg_engine))
    created, deleted = (
        decode_message(m, schemas=registry) for m in drain_queue(amqp_url, bound_queue, expected=2)
    )

    assert created.action is outbox.Action.CREATE
    assert created.schema == CASE_URI
    assert created.schema_version == 1
    assert created.content == {"tenantId": 1, "id": 7, "title": "t"}
    assert created.reference is None
    assert created.key == "case:1:7"
    with pg_engine.connect() as connection:
        ids = connection.execute(select(table.event.c.event_id).order_by("position")).scalars()
        assert [created.message_id, deleted.message_id] == [str(i) for i in ids]

    assert deleted.action is outbox.Action.DELETE
    assert deleted.reference == outbox.ResourceReference(tenant_id=1, id=7, version=3)


def test_content_is_validated_against_local_schema_files(tmp_path: Path) -> None:
    schema_file = tmp_path / "case.json"
    schema_file.write_text(json.dumps(CASE_SCHEMA), "utf-8")
    local = SchemaRegistry.from_files(schema_file)
    good = {
        "action": "update",
        "resource": {"schema": CASE_URI, "content": {"tenantId": 1, "id": 2}},
    }
    # The producer's version number (9) means nothing to local files: the latest is used.
    headers = {"outbox-schema-version": 9}
    event = decode(json.dumps(good), headers, message_id="m-1", schemas=local)
    assert isinstance(event, ReceivedEvent)
    assert (event.action, event.content, event.schema_version) == (
        "update",
        {"tenantId": 1, "id": 2},
        9,
    )

    bad = {
        "action": "update",
        "resource": {"schema": CASE_URI, "content": {"tenantId": "one", "id": 2}},
    }
    with pytest.raises(ContentValidationError, match="tenantId: 'one' is not of type 'integer'"):
        decode(json.dumps(bad), headers, schemas=local)
    assert (
        decode(json.dumps(bad), headers, schemas=local, validate=False).content["tenantId"] == "one"
    )

    unknown = {"action": "update", "resource": {"schema": "https://example.org/x/y", "content": {}}}
    assert decode(json.dumps(unknown), schemas=local).schema == "https://example.org/x/y"
    with pytest.raises(ContentValidationError, match="not registered"):
        decode(json.dumps(unknown), schemas=local, strict=True)
    with pytest.raises(EnvelopeError, match="not JSON"):
        decode(b"\xc3\x01garbage")
    with pytest.raises(EnvelopeError, match="invalid envelope"):
        decode(json.dumps({"action": "explode", "resource": {}}))


def test_avro_bodies_are_single_object_encoded_and_decoded(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    from fastavro import parse_schema, schemaless_reader
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    registry = SchemaRegistry(pg_engine)
    registry.register(NOTE_URI, NOTE_V1)
    registry.register(CASE_URI, CASE_SCHEMA)
    note = {"tenantId": 1, "id": 5, "text": "call back", "pinned": True}
    produce(
        pg_engine,
        registry,
        outbox.Envelope(action="create", schema=NOTE_URI, content=note),
        outbox.Envelope(action="create", schema=CASE_URI, content={"tenantId": 1, "id": 6}),
    )
    relay_all(pg_engine, amqp_url, exchange_name, 2, **relay_hooks(pg_engine, body_format="avro"))
    avro_message, json_message = drain_queue(amqp_url, bound_queue, expected=2)

    assert avro_message.content_type == "application/avro"
    body = avro_message.body
    crc = fingerprint(to_parsing_canonical_form(NOTE_V1), "CRC-64-AVRO")
    assert body[:2] == b"\xc3\x01" and body[2:10].hex() == crc
    # Any Avro library can read it: plain fastavro with the writer schema.
    assert schemaless_reader(_bytes_io(body[10:]), parse_schema(NOTE_V1), None) == note
    assert avro_message.headers["outbox-action"] == "create"
    assert avro_message.headers["outbox-schema"] == NOTE_URI

    event = decode_message(avro_message, schemas=registry)
    assert (event.action, event.schema, event.content) == ("create", NOTE_URI, note)
    # A consumer built against a newer version reads the old bytes, with the default.
    newer = decode_message(avro_message, schemas=registry, avro_readers={NOTE_URI: NOTE_V2})
    assert newer.content == {**note, "colour": "yellow"}

    assert json_message.content_type == "application/json"  # JSON Schema resources stay JSON
    assert decode_message(json_message, schemas=registry).content == {"tenantId": 1, "id": 6}

    with pytest.raises(EnvelopeError, match="needs a schema registry"):
        decode_message(avro_message)
    with pytest.raises(EnvelopeError, match="no registered Avro schema has the fingerprint"):
        decode_message(avro_message, schemas=SchemaRegistry())


def test_invalid_avro_content_is_refused_by_the_producer_with_its_field(pg_engine: Engine) -> None:
    registry = SchemaRegistry(pg_engine)
    registry.register(NOTE_URI, NOTE_V1)
    bad = {"tenantId": 1, "id": 5, "text": "x", "pinned": "yes"}
    with pytest.raises(
        ContentValidationError,
        match=f"content does not match {NOTE_URI} version 1: pinned: 'yes' is not a valid boolean",
    ):
        produce(pg_engine, registry, outbox.Envelope(action="create", schema=NOTE_URI, content=bad))


def test_content_the_relay_cannot_avro_encode_is_marked_dead(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    registry = SchemaRegistry(pg_engine)
    registry.register(NOTE_URI, NOTE_V1)
    unvalidated = sessionmaker(pg_engine)
    outbox.configure(unvalidated, outbox.ProducerOptions(schemas=registry, validate=False))
    with unvalidated() as session, session.begin():
        outbox.publish(
            session,
            outbox.Envelope(
                action="create", schema=NOTE_URI, content={"tenantId": 1, "id": 1, "text": 5}
            ),
        )
    # Content validation off, Avro bodies on: the encoder refuses the row itself.
    hooks = relay_hooks(pg_engine, validate=False, body_format="avro")
    relay_all(pg_engine, amqp_url, exchange_name, 0, **hooks)
    with pg_engine.connect() as connection:
        state, error = connection.execute(
            select(table.event.c.state, table.event.c.last_error)
        ).one()
    assert state == "dead"
    assert error.startswith("content cannot be Avro-encoded:")
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.5) == []


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


# -- the idempotent consumer ------------------------------------------------------------------


@pytest.fixture
def consumer_db(pg_engine: Engine) -> tuple[Engine, Table]:
    """The consumer's own table of effects, next to its inbox."""
    effects = Table(
        "consumer_effect",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("case_id", Integer, nullable=False),
        Column("title", Text, nullable=False),
    )
    effects.create(pg_engine)
    create_inbox_table(pg_engine)  # already migrated here: a no-op, as for any consumer
    return pg_engine, effects


def consume(
    amqp_url: str, queue: kombu.Queue, handle: Callable[[Any], None], *, until: Callable[[], bool]
) -> None:
    """Deliver messages to ``handle`` until ``until()``; the connection closes afterwards."""
    deadline = time.monotonic() + 20
    with (
        kombu.Connection(amqp_url) as connection,
        connection.Consumer(queue, on_message=handle, prefetch_count=10),
    ):
        while not until():
            assert time.monotonic() < deadline, "messages did not arrive in time"
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                continue


def effect_count(engine: Engine, effects: Table) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(effects)).scalar_one())


def test_a_redelivered_message_is_processed_once(
    consumer_db: tuple[Engine, Table],
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    engine, effects = consumer_db
    registry = SchemaRegistry(engine)
    registry.register(CASE_URI, CASE_SCHEMA)
    produce(
        engine,
        registry,
        *(
            outbox.Envelope(
                action="update", schema=CASE_URI, content={"tenantId": 1, "id": i, "title": f"t{i}"}
            )
            for i in (1, 2)
        ),
    )
    relay_all(engine, amqp_url, exchange_name, 2)

    handled: list[tuple[int, bool]] = []

    def apply(connection: Connection, event: ReceivedEvent) -> None:
        connection.execute(
            effects.insert().values(case_id=event.content["id"], title=event.content["title"])
        )

    consumer = IdempotentConsumer(engine, "billing", apply, schemas=registry)

    # First delivery: processed and committed, then the consumer "crashes" before acking.
    def process_without_ack(message: Any) -> None:
        event = decode_message(message, schemas=registry)
        handled.append((event.content["id"], consumer.process(event)))

    consume(amqp_url, bound_queue, process_without_ack, until=lambda: len(handled) == 2)
    assert handled == [(1, True), (2, True)]
    assert effect_count(engine, effects) == 2

    # The broker redelivers both (never acked); the inbox turns them into no-ops.
    redelivered: list[bool] = []

    def handle(message: Any) -> None:
        redelivered.append(bool(message.delivery_info.get("redelivered")))
        consumer.handle_message(message)

    consume(amqp_url, bound_queue, handle, until=lambda: len(redelivered) == 2)
    assert redelivered == [True, True]
    assert effect_count(engine, effects) == 2
    with engine.connect() as connection:
        inbox = connection.execute(
            select(table.inbox.c.consumer, func.count()).group_by(table.inbox.c.consumer)
        ).all()
    assert [tuple(row) for row in inbox] == [("billing", 2)]
    # Both were acked this time: nothing is left in the queue.
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.5) == []


def test_a_failed_handler_rolls_back_its_claim_and_the_message_is_retried(
    consumer_db: tuple[Engine, Table],
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    engine, effects = consumer_db
    registry = SchemaRegistry(engine)
    produce(
        engine,
        registry,
        outbox.Envelope(
            action="create", schema=CASE_URI, content={"tenantId": 1, "id": 3, "title": "x"}
        ),
    )
    relay_all(engine, amqp_url, exchange_name, 1)
    attempts: list[int] = []

    def flaky(session: Session, event: ReceivedEvent) -> None:
        session.execute(effects.insert().values(case_id=event.content["id"], title="written"))
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("downstream service unavailable")

    consumer = IdempotentConsumer(sessionmaker(engine), "search-index", flaky)
    consume(amqp_url, bound_queue, consumer.handle_message, until=lambda: len(attempts) == 2)

    assert effect_count(engine, effects) == 1  # the failed attempt's write was rolled back
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.5) == []
    with engine.begin() as connection:
        (message_id,) = connection.execute(select(table.inbox.c.message_id)).scalars()
        assert claim(connection, "search-index", message_id) is False
        assert claim(connection, "another-consumer", message_id) is True


def test_an_undecodable_message_is_rejected_without_requeue(
    pg_engine: Engine, amqp_url: str, bound_queue: kombu.Queue, exchange_name: str
) -> None:
    consumer = IdempotentConsumer(pg_engine, "c", lambda connection, event: None)
    with kombu.Connection(amqp_url) as connection:
        producer = connection.Producer()
        producer.publish(
            b"not json",
            exchange=kombu.Exchange(exchange_name, type="topic", durable=True),
            routing_key="case.update",
            content_type="application/json",
            message_id="m-undecodable",
        )
    seen: list[Any] = []

    def handle(message: Any) -> None:
        seen.append(message)
        consumer.handle_message(message)

    consume(amqp_url, bound_queue, handle, until=lambda: len(seen) == 1)
    assert seen[0].acknowledged
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.5) == []
    with pg_engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(table.inbox)).scalar_one() == 0


def test_the_inbox_works_on_sqlite(sqlite_engine: Engine) -> None:
    with sqlite_engine.begin() as connection:
        assert claim(connection, "c", "m-1") is True
        assert claim(connection, "c", "m-1") is False
    with sqlite_engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(table.inbox)).scalar_one() == 1


class FakeMessage:
    """What handle_message needs of a kombu message."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers: dict[str, Any] = {}
        self.content_type = "application/json"
        self.properties = {"message_id": "m-1"}
        self.outcome = ""

    def ack(self) -> None:
        self.outcome = "acked"

    def requeue(self) -> None:
        self.outcome = "requeued"

    def reject(self, requeue: bool) -> None:
        self.outcome = f"rejected (requeue={requeue})"


@pytest.fixture(params=["postgresql", "sqlite"])
def unmigrated_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A consumer's database where `outbox migrate` never ran."""
    if request.param == "postgresql":
        database = request.getfixturevalue("empty_pg_database")
        engine = create_outbox_engine(pg_url(database))
    else:
        engine = create_outbox_engine(f"sqlite:///{tmp_path / 'consumer.db'}")
    yield engine
    engine.dispose()


def test_a_missing_inbox_table_says_how_to_create_it(unmigrated_engine: Engine) -> None:
    handled: list[ReceivedEvent] = []
    consumer = IdempotentConsumer(
        unmigrated_engine, "billing", lambda connection, event: handled.append(event)
    )
    body = json.dumps(
        {"action": "create", "resource": {"schema": CASE_URI, "content": {"tenantId": 1, "id": 1}}}
    )
    message = FakeMessage(body.encode("utf-8"))
    fix = "outbox_inbox does not exist in this database: run `outbox migrate` against it"
    with pytest.raises(SchemaNotMigrated, match=re.escape(fix)):
        consumer.handle_message(message)
    assert message.outcome == "requeued"  # kept for when the table exists
    assert handled == []
    with unmigrated_engine.connect() as connection, pytest.raises(SchemaNotMigrated):
        claim(connection, "billing", "m-1")

    create_inbox_table(unmigrated_engine)  # the same as `outbox migrate`
    assert migrate.current_revision(unmigrated_engine) == migrate.head_revision(unmigrated_engine)
    consumer.handle_message(message)
    assert message.outcome == "acked"
    assert [event.message_id for event in handled] == ["m-1"]
