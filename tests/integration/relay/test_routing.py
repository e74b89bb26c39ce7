"""Rows that carry their destination: an exchange and routing key per resource, tenant, event.

Against the real PostgreSQL and RabbitMQ: a resource routed per tenant to an
exchange of its own, an explicit ``publish(exchange=...)``, row exchanges the
broker refuses (403 on declare, 404 on publish) that go dead while other keys
flow, a replay that keeps to its own exchange; and what ``publish`` refuses.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pytest
from sqlalchemy import Engine, Integer, String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox.errors import ConfigurationError, ResourceContentError, UnsendableEventError
from outbox.producer.models import Destination
from outbox.relay.frames import PublishEncoder
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.message import OutgoingMessage
from outbox.relay.publisher import open_publisher
from outbox.store import migrate, table
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url
from tests.integration.relay.test_replay import cli as replay_cli

SCHEMA = "https://example.org/schemas/case.json"


@pytest.fixture
def queues(amqp_url: str) -> Iterator[Callable[[str], kombu.Queue]]:
    """Make a queue bound to every key (``#``) of an exchange; both deleted after the test."""
    made: list[kombu.Queue] = []

    def bind(exchange: str) -> kombu.Queue:
        queue = kombu.Queue(
            f"{exchange}-all",
            exchange=kombu.Exchange(exchange, type="topic", durable=True),
            routing_key="#",
            durable=True,
        )
        with kombu.Connection(amqp_url) as connection:
            queue(connection.default_channel).declare()
        made.append(queue)
        return queue

    yield bind
    with kombu.Connection(amqp_url) as connection:
        channel = connection.channel()
        for queue in made:
            with contextlib.suppress(Exception):
                channel.queue_delete(queue.name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(queue.exchange.name)


def envelope(key_id: int, version: int, tenant: int = 1) -> outbox.Envelope:
    return outbox.Envelope(
        action="update",
        schema=SCHEMA,
        content={"tenantId": tenant, "id": key_id, "version": version},
    )


def publish(engine: Engine, key_id: int, versions: range, **kwargs: Any) -> list[str]:
    with Session(engine) as session, session.begin():
        return [str(outbox.publish(session, envelope(key_id, v), **kwargs)) for v in versions]


def relay_for(engine: Engine, amqp_url: str, exchange: str, **options: Any) -> Relay:
    return Relay(
        SqlStore(engine),
        open_publisher(amqp_url, exchange, **options),
        RelaySettings(backoff_initial=0.01, backoff_max=0.05),
    )


def row_of(engine: Engine, event_id: str) -> Any:
    E = table.event
    with engine.connect() as connection:
        return connection.execute(select(E).where(E.c.event_id == uuid.UUID(event_id))).one()


def ids_of(messages: list[Any]) -> list[str]:
    return [m.properties["message_id"] for m in messages]


def routed_model(exchange: str) -> tuple[type[DeclarativeBase], type[Any]]:
    """A resource whose events go to one exchange per tenant, keyed by type, action, tenant."""

    class Base(DeclarativeBase):
        pass

    @outbox.resource(
        schema=SCHEMA,
        exchange=exchange + ".t{tenantId}",
        routing_key="{type}.{action}.{tenantId}",
    )
    class RoutedCase(Base):
        __tablename__ = "routed_case"
        tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        version: Mapped[int] = mapped_column(Integer)
        __mapper_args__ = {"version_id_col": version}  # noqa: RUF012
        title: Mapped[str] = mapped_column(String(100))

    return Base, RoutedCase


def test_a_resource_routed_per_tenant_reaches_only_its_tenants_exchange(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    queues: Callable[[str], kombu.Queue],
) -> None:
    """Each tenant's queue gets exactly that tenant's events, in commit order; the
    relay's own exchange gets none."""
    Base, RoutedCase = routed_model(exchange_name)
    Base.metadata.create_all(pg_engine)
    factory = outbox.instrument(sessionmaker(pg_engine))
    for n in range(3):
        for tenant in (1, 2):
            with factory.begin() as session:
                case = session.get(RoutedCase, (tenant, 1))
                if case is None:
                    session.add(RoutedCase(tenant_id=tenant, id=1, title="new"))
                else:
                    case.title = f"change {n}"
    with factory.begin() as session:
        session.delete(session.get(RoutedCase, (2, 1)))

    tenant_queues = {t: queues(f"{exchange_name}.t{t}") for t in (1, 2)}
    assert relay_for(pg_engine, amqp_url, exchange_name).drain(timeout=30) == 7

    received = {
        t: drain_queue(amqp_url, q, expected=4, timeout=3) for t, q in tenant_queues.items()
    }
    actions = {t: [json.loads(m.body)["action"] for m in ms] for t, ms in received.items()}
    assert actions == {
        1: ["create", "update", "update"],
        2: ["create", "update", "update", "delete"],
    }
    for tenant, messages in received.items():
        assert {m.delivery_info["exchange"] for m in messages} == {f"{exchange_name}.t{tenant}"}
        assert [m.delivery_info["routing_key"] for m in messages] == [
            f"routed_case.{a}.{tenant}" for a in actions[tenant]
        ]
        contents = [json.loads(m.body)["resource"]["content"] for m in messages]
        assert {c["tenantId"] for c in contents} == {tenant}
    titles = [json.loads(m.body)["resource"]["content"]["title"] for m in received[1]]
    assert titles == ["new", "change 1", "change 2"]
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.3) == []
    with pg_engine.connect() as connection:
        stored = connection.execute(select(table.event.c.exchange).distinct()).scalars().all()
    assert sorted(stored) == [f"{exchange_name}.t1", f"{exchange_name}.t2"]


def test_an_explicit_publish_goes_to_its_exchange_and_none_to_the_relays(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    queues: Callable[[str], kombu.Queue],
) -> None:
    other = queues(f"{exchange_name}.other")
    elsewhere = publish(pg_engine, 1, range(1, 3), exchange=f"{exchange_name}.other")
    routed = publish(
        pg_engine, 2, range(1, 2), exchange=f"{exchange_name}.other", routing_key="cases.custom"
    )
    home = publish(pg_engine, 3, range(1, 3))

    assert relay_for(pg_engine, amqp_url, exchange_name).drain(timeout=30) == 5

    arrived = drain_queue(amqp_url, other, expected=3)
    assert sorted(ids_of(arrived)) == sorted(elsewhere + routed)
    keys = {m.properties["message_id"]: m.delivery_info["routing_key"] for m in arrived}
    assert [keys[i] for i in elsewhere + routed] == ["case.update", "case.update", "cases.custom"]
    assert [i for i in ids_of(arrived) if i in elsewhere] == elsewhere  # one key: in order
    assert ids_of(drain_queue(amqp_url, bound_queue, expected=2)) == home
    assert row_of(pg_engine, home[0]).exchange is None
    assert row_of(pg_engine, elsewhere[0]).exchange == f"{exchange_name}.other"


def test_a_row_exchange_the_broker_refuses_to_declare_is_dead_and_holds_only_its_key(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    """RabbitMQ refuses to declare an ``amq.`` name (403, the channel closes): that row is
    dead with the broker's words at the first attempt, its key waits, other keys flow."""
    before = publish(pg_engine, 1, range(1, 3))
    bad, *held = publish(pg_engine, 2, range(1, 4))
    after = [*publish(pg_engine, 1, range(3, 5)), *publish(pg_engine, 3, range(1, 3))]
    with pg_engine.begin() as connection:  # written by other means than publish
        connection.execute(
            update(table.event)
            .where(table.event.c.event_id == uuid.UUID(bad))
            .values(exchange="amq.bad")
        )

    relay = relay_for(pg_engine, amqp_url, exchange_name)
    assert relay.drain(timeout=30) == 6

    arrived = drain_queue(amqp_url, bound_queue, expected=6)
    assert sorted(ids_of(arrived)) == sorted(before + after)
    assert [m.headers["outbox-key"] for m in arrived].count("case:1:1") == 4
    dead = row_of(pg_engine, bad)
    assert dead.state == table.DEAD
    assert "ACCESS_REFUSED" in dead.last_error and "amq.bad" in dead.last_error
    assert dead.attempts <= 1  # no retry: it was the exchange, not the broker
    assert [row_of(pg_engine, e).state for e in held] == [table.PENDING] * 2


def test_a_row_exchange_of_another_type_is_dead_and_later_exchanges_still_flow(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    queues: Callable[[str], kombu.Queue],
) -> None:
    """406 on declare (a direct exchange of that name exists): the relay reconnects and
    declares the next row exchange of the same wave, which receives its events."""
    direct = f"{exchange_name}.direct"
    with kombu.Connection(amqp_url) as connection:
        connection.channel().exchange_declare(direct, "direct", durable=False)
    later = queues(f"{exchange_name}.later")
    [bad] = publish(pg_engine, 1, range(1, 2), exchange=direct)
    routed = publish(pg_engine, 2, range(1, 3), exchange=f"{exchange_name}.later")
    home = publish(pg_engine, 3, range(1, 3))

    try:
        assert relay_for(pg_engine, amqp_url, exchange_name).drain(timeout=30) == 4
    finally:
        with kombu.Connection(amqp_url) as connection:
            connection.channel().exchange_delete(direct)

    assert ids_of(drain_queue(amqp_url, later, expected=2)) == routed
    assert ids_of(drain_queue(amqp_url, bound_queue, expected=2)) == home
    dead = row_of(pg_engine, bad)
    assert dead.state == table.DEAD
    assert "PRECONDITION_FAILED" in dead.last_error and direct in dead.last_error


def test_a_missing_row_exchange_is_dead_when_the_relay_does_not_declare(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    """Without declare_exchange, RabbitMQ answers a publish to a missing exchange with
    404 and closes the channel: the row is dead with those words, the rest flows."""
    missing = f"{exchange_name}.missing"
    fine = publish(pg_engine, 1, range(1, 4))
    [bad] = publish(pg_engine, 2, range(1, 2), exchange=missing)
    more = publish(pg_engine, 3, range(1, 3))

    relay = relay_for(pg_engine, amqp_url, exchange_name, declare_exchange=False)
    relay.drain(timeout=30)

    arrived = drain_queue(amqp_url, bound_queue, expected=10, timeout=3)
    assert sorted(set(ids_of(arrived))) == sorted(fine + more)  # at least once: resends
    dead = row_of(pg_engine, bad)
    assert dead.state == table.DEAD
    assert "NOT_FOUND" in dead.last_error and missing in dead.last_error


def test_a_replay_publishes_to_its_own_exchange_not_the_rows(
    pg_engine: Engine,
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    queues: Callable[[str], kombu.Queue],
) -> None:
    routed = queues(f"{exchange_name}.routed")
    ids = publish(pg_engine, 7, range(1, 3), exchange=f"{exchange_name}.routed")
    assert relay_for(pg_engine, amqp_url, exchange_name).drain(timeout=30) == 2
    assert ids_of(drain_queue(amqp_url, routed, expected=2)) == ids

    assert replay_cli(pg_database, amqp_url, exchange_name, "--key", "case:1:7") == 0

    assert ids_of(drain_queue(amqp_url, bound_queue, expected=2)) == ids
    assert drain_queue(amqp_url, routed, expected=1, timeout=0.3) == []


# --- refused at publish ------------------------------------------------------------


@pytest.mark.parametrize(
    ("exchange", "reason"),
    [
        ("x" * 256, "256 bytes"),
        ("é" * 128, "256 bytes"),
        ("cases tenant", "only letters, digits"),
        ("cases/1", "only letters, digits"),
        ("", "non-empty"),
    ],
)
def test_an_exchange_the_broker_could_not_take_is_refused_at_publish(
    sqlite_engine: Engine, exchange: str, reason: str
) -> None:
    with Session(sqlite_engine) as session, session.begin():
        with pytest.raises(UnsendableEventError, match=reason):
            outbox.publish(session, envelope(1, 1), exchange=exchange)
        outbox.publish(session, envelope(1, 2), exchange="cases-1_a.b:c")
    with sqlite_engine.connect() as connection:
        stored = connection.execute(select(table.event.c.exchange)).scalars().all()
    assert stored == ["cases-1_a.b:c"]


def test_a_template_naming_a_missing_field_is_refused_at_commit(sqlite_engine: Engine) -> None:
    model, factory = routed_case(sqlite_engine, exchange="cases.{region}")
    with (
        pytest.raises(ResourceContentError, match=r"\{region\}.*tenantId") as caught,
        factory.begin() as session,
    ):
        session.add(model(tenant_id=1, id=1))
    assert "exchange template 'cases.{region}'" in str(caught.value)
    with sqlite_engine.connect() as connection:
        assert connection.execute(select(table.event.c.position)).all() == []


def routed_case(
    engine: Engine, *, exchange: Destination, routing_key: Destination | None = None
) -> tuple[Any, sessionmaker[Session]]:
    """A resource routed by ``exchange`` and ``routing_key``, its table, an instrumented factory."""

    class Base(DeclarativeBase):
        pass

    @outbox.resource(schema=SCHEMA, exchange=exchange, routing_key=routing_key)
    class RoutedCase(Base):
        __tablename__ = "routed_case"
        tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        version: Mapped[int] = mapped_column(Integer)
        __mapper_args__ = {"version_id_col": version}  # noqa: RUF012

    Base.metadata.create_all(engine)
    return RoutedCase, outbox.instrument(sessionmaker(engine))


def routed_by_function(
    engine: Engine, exchange_of: Callable[[Any], str]
) -> tuple[Any, sessionmaker[Session]]:
    return routed_case(
        engine,
        exchange=lambda obj, action: exchange_of(obj),
        routing_key=lambda obj, action: f"{action}.{obj.id}",
    )


def test_a_computed_destination_is_checked_like_an_explicit_one(sqlite_engine: Engine) -> None:
    model, factory = routed_by_function(sqlite_engine, lambda obj: f"cases {obj.tenant_id}")
    with (
        pytest.raises(ResourceContentError, match="only letters") as caught,
        factory.begin() as session,
    ):
        session.add(model(tenant_id=1, id=1))
    assert isinstance(caught.value.__cause__, UnsendableEventError)


def test_a_callable_destination_is_stored(sqlite_engine: Engine) -> None:
    model, factory = routed_by_function(sqlite_engine, lambda obj: f"cases.{obj.tenant_id}")
    with factory.begin() as session:
        session.add(model(tenant_id=4, id=9))
    E = table.event
    with sqlite_engine.connect() as connection:
        row = connection.execute(select(E.c.exchange, E.c.routing_key)).one()
    assert tuple(row) == ("cases.4", "create.9")


@pytest.mark.parametrize("template", ["cases.{}", "cases.{0}", "cases.{a.b}", "cases.{a", ""])
def test_a_template_that_names_no_field_is_refused_at_declaration(template: str) -> None:
    with pytest.raises(ConfigurationError, match=r"outbox\.resource"):
        outbox.resource(schema=SCHEMA, routing_key=template)


def test_the_encoder_names_each_messages_exchange() -> None:
    encoder = PublishEncoder(channel_id=1, exchange="home", frame_max=131072)

    def frames(exchange: str | None) -> bytes:
        message = OutgoingMessage(
            position=1,
            message_id="m",
            routing_key="case.update",
            body=b"{}",
            content_type="application/json",
            timestamp=dt.datetime.now(dt.UTC),
            headers={},
            exchange=exchange,
        )
        return encoder.encode(message)

    # Cached by (exchange, routing key): the same key on another exchange is another frame.
    assert b"\x04home\x0bcase.update" in frames(None)
    assert b"\x05other\x0bcase.update" in frames("other")
    assert b"\x04home\x0bcase.update" in frames(None)


def test_a_relay_on_an_older_schema_publishes_and_routes_once_migrated(
    empty_pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    queues: Callable[[str], kombu.Queue],
) -> None:
    """Before outbox_0003 every row goes to the relay's exchange; the same relay reads
    the rows' exchanges from its first fetch after the migration added the column."""
    routed = queues(f"{exchange_name}.routed")
    engine = create_outbox_engine(pg_url(empty_pg_database))
    try:
        migrate.upgrade(engine, revision="outbox_0002")
        old = publish(engine, 1, range(1, 3))
        relay = relay_for(engine, amqp_url, exchange_name)
        assert relay.drain(timeout=30) == 2
        assert ids_of(drain_queue(amqp_url, bound_queue, expected=2)) == old

        migrate.upgrade(engine)
        new = publish(engine, 1, range(3, 5), exchange=f"{exchange_name}.routed")
        assert relay.drain(timeout=30) == 2
        assert ids_of(drain_queue(amqp_url, routed, expected=2)) == new
    finally:
        engine.dispose()
