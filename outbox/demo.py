"""``outbox demo``: the whole path on one machine with no server.

SQLite holds the resources and the outbox; kombu's filesystem transport is the
broker. The demo writes resources and their events in one transaction each
(and one transaction that rolls back), drains the relay, then consumes and
prints every message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kombu
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import migrate
from outbox.database import create_outbox_engine
from outbox.envelope import Action, Envelope, ResourceReference
from outbox.producer import publish
from outbox.publisher import KombuPublisher
from outbox.relay import Relay, RelaySettings
from outbox.store import SqlStore

CASE_SCHEMA = "https://example.org/schemas/case.json"


class _Base(DeclarativeBase):
    pass


class DemoCase(_Base):
    __tablename__ = "demo_case"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    title: Mapped[str] = mapped_column(String(200))

    def content(self) -> dict[str, Any]:
        return {
            "tenantId": self.tenant_id,
            "id": self.id,
            "version": self.version,
            "title": self.title,
        }


def broker_url(directory: Path) -> tuple[str, dict[str, Any]]:
    folder = directory / "broker"
    folder.mkdir(parents=True, exist_ok=True)
    return "filesystem://", {"data_folder_in": str(folder), "data_folder_out": str(folder)}


def run_demo(values: dict[str, Any], *, directory: str, count: int) -> int:
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    database_url = values.get("database_url") or f"sqlite:///{root / 'outbox.db'}"
    exchange = values.get("exchange") or "outbox"
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
    with Session(engine) as session:
        start = (session.query(DemoCase.id).order_by(DemoCase.id.desc()).limit(1).scalar() or 0) + 1
    ids = list(range(start, start + count))
    for case_id in ids:
        with Session(engine) as session, session.begin():
            case = DemoCase(tenant_id=1, id=case_id, title=f"Case {case_id}")
            session.add(case)
            session.flush()
            publish(
                session, Envelope(action=Action.CREATE, schema=CASE_SCHEMA, content=case.content())
            )
    with Session(engine) as session, session.begin():
        case = session.get_one(DemoCase, (1, ids[0]))
        case.title, case.version = "Renamed", case.version + 1
        publish(session, Envelope(action=Action.UPDATE, schema=CASE_SCHEMA, content=case.content()))
    with Session(engine) as session, session.begin():
        case = session.get_one(DemoCase, (1, ids[-1]))
        session.delete(case)
        reference = ResourceReference(tenant_id=1, id=case.id, version=case.version)
        publish(session, Envelope(action=Action.DELETE, schema=CASE_SCHEMA, content=reference))
    with Session(engine) as session:
        session.begin()
        publish(
            session,
            Envelope(
                action=Action.UPDATE, schema=CASE_SCHEMA, content={"tenantId": 1, "id": ids[0]}
            ),
        )
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
