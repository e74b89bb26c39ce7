"""``outbox demo``: the whole path on one machine with no server.

SQLite holds the resources and the outbox; kombu's filesystem transport is the
broker. The demo changes resources through an instrumented session factory, so
the session hooks write their events in the same transaction (one transaction
rolls back and publishes nothing), drains the relay, then consumes and prints
every message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kombu
from sqlalchemy import ForeignKeyConstraint, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from outbox.cli.settings import Settings
from outbox.producer.hooks import child_of, instrument, resource
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import KombuPublisher
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore

CASE_SCHEMA = "https://example.org/schemas/case.json"


class _Base(DeclarativeBase):
    pass


@resource(schema=CASE_SCHEMA, resource_type="case")
class DemoCase(_Base):
    __tablename__ = "demo_case"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    title: Mapped[str] = mapped_column(String(200))
    notes: Mapped[list[DemoNote]] = relationship(back_populates="case")
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


@child_of("case")
class DemoNote(_Base):
    """Adding a note is an update of its case (one event, a new version)."""

    __tablename__ = "demo_note"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(String(200))
    case: Mapped[DemoCase] = relationship(back_populates="notes")
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "case_id"], ["demo_case.tenant_id", "demo_case.id"]),
    )


def broker_url(directory: Path) -> tuple[str, dict[str, Any]]:
    folder = directory / "broker"
    folder.mkdir(parents=True, exist_ok=True)
    return "filesystem://", {"data_folder_in": str(folder), "data_folder_out": str(folder)}


def run_demo(settings: Settings, *, directory: str, count: int) -> int:
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    database_url = settings.database.url or f"sqlite:///{root / 'outbox.db'}"
    exchange = settings.broker.exchange or "outbox"
    engine = create_outbox_engine(database_url)
    migrate.upgrade(engine)
    _Base.metadata.create_all(engine)
    print(f"database  {database_url}")

    url, transport_options = broker_url(root)
    queue = kombu.Queue(
        "outbox-demo",
        exchange=kombu.Exchange(exchange, type="topic", durable=True),
        routing_key="#",
    )
    with kombu.Connection(url, transport_options=transport_options) as consumer_connection:
        queue(consumer_connection.default_channel).declare()
        print(f"broker    {url} in {root / 'broker'}")

        first_id = _write_resources(engine, count)
        print(f"wrote     {count} create events, 1 update, 1 delete; 1 rolled-back transaction")

        publisher = KombuPublisher(url, exchange, transport_options=transport_options)
        relay = Relay(SqlStore(engine), publisher, RelaySettings(poll_interval=0.1))
        relayed = relay.drain(timeout=60)
        print(f"relayed   {relayed} events")

        received = _consume(consumer_connection, queue)
    for message in received:
        print(json.dumps(message, sort_keys=False))
    print(f"consumed  {len(received)} messages (first resource id {first_id})")
    engine.dispose()
    return 0 if received else 1


def _write_resources(engine: Any, count: int) -> int:
    # The session hooks write each event: no publish() call below.
    factory = instrument(sessionmaker(engine))
    with factory() as session:
        start = (session.query(DemoCase.id).order_by(DemoCase.id.desc()).limit(1).scalar() or 0) + 1
    ids = list(range(start, start + count))
    for case_id in ids:
        with factory.begin() as session:
            session.add(DemoCase(tenant_id=1, id=case_id, title=f"Case {case_id}"))
    with factory.begin() as session:
        case = session.get_one(DemoCase, (1, ids[0]))
        case.title = "Renamed"
        session.add(DemoNote(case=case, text="renamed on request"))
    with factory.begin() as session:
        session.delete(session.get_one(DemoCase, (1, ids[-1])))
    with factory() as session:
        session.begin()
        session.get_one(DemoCase, (1, ids[0])).title = "Never"
        session.flush()
        session.rollback()  # no event: the change it described never happened
    return ids[0]


def _consume(connection: kombu.Connection, queue: kombu.Queue) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    bound = queue(connection.default_channel)
    while (message := bound.get(no_ack=True)) is not None:
        received.append(
            {
                "routing_key": message.delivery_info.get("routing_key"),
                "message_id": message.properties.get("message_id"),
                "ce-type": message.headers.get("ce-type"),
                "body": json.loads(message.body),
            }
        )
    return received
