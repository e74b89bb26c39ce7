from __future__ import annotations

import json

import kombu
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue

SCHEMA = "https://example.org/schemas/case.json"


def test_committed_events_reach_rabbitmq_in_order(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    with Session(pg_engine) as session, session.begin():
        for version in range(1, 51):
            outbox.publish(
                session,
                outbox.Envelope(
                    action="update",
                    schema=SCHEMA,
                    content={"tenantId": 1, "id": 7, "version": version},
                ),
            )
    with Session(pg_engine) as session:
        session.begin()
        outbox.publish(
            session,
            outbox.Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, "id": 8}),
        )
        session.rollback()

    relay = Relay(
        SqlStore(pg_engine), open_publisher(amqp_url, exchange_name), RelaySettings(batch_size=20)
    )
    assert relay.drain(timeout=30) == 50
    messages = drain_queue(amqp_url, bound_queue, expected=50)
    versions = [json.loads(m.body)["resource"]["content"]["version"] for m in messages]
    assert versions == list(range(1, 51))
    assert SqlStore(pg_engine).counts()["delivered"] == 50
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.5) == []
