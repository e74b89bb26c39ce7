"""Concurrent writers on one resource: events reach RabbitMQ in commit order."""

from __future__ import annotations

import json
import threading

import kombu
import psycopg
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

import outbox
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue
from tests.hooks_models import Base, Case, CaseNote

WRITERS = 4
CHANGES_PER_WRITER = 8


def change_field_and_add_child(factory: sessionmaker[Session], writer: int, n: int) -> None:
    """Pessimistic: lock the row first (SELECT ... FOR UPDATE)."""
    with factory.begin() as session:
        case = session.scalars(select(Case).with_for_update()).one()
        case.title = f"writer {writer} change {n}"
        session.add(CaseNote(case=case, text=f"{writer}/{n}"))


def add_child_only(factory: sessionmaker[Session], writer: int, n: int) -> None:
    """Optimistic: only a child changes; the parent's version bump detects the race."""
    while True:
        try:
            with factory.begin() as session:
                case = session.scalars(select(Case)).one()
                session.add(CaseNote(case=case, text=f"{writer}/{n}"))
            return
        except StaleDataError:
            continue  # another writer committed first: retry on the new version
        except OperationalError as exc:
            # Lock upgrades racing a FOR UPDATE writer may deadlock; PostgreSQL
            # aborts one of them, which retries, as any application would.
            if not isinstance(exc.orig, psycopg.errors.DeadlockDetected):
                raise


def test_concurrent_writers_on_one_resource_publish_in_commit_order(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    Base.metadata.create_all(pg_engine)
    factory = outbox.instrument(sessionmaker(pg_engine))
    with factory.begin() as session:
        session.add(Case(tenant_id=1, id=1, title="Contended"))

    errors: list[BaseException] = []
    start = threading.Barrier(WRITERS)

    def writer(index: int) -> None:
        change = change_field_and_add_child if index % 2 == 0 else add_child_only
        try:
            start.wait()
            for n in range(CHANGES_PER_WRITER):
                change(factory, index, n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    total = 1 + WRITERS * CHANGES_PER_WRITER
    relay = Relay(
        SqlStore(pg_engine), open_publisher(amqp_url, exchange_name), RelaySettings(batch_size=7)
    )
    assert relay.drain(timeout=30) == total
    messages = drain_queue(amqp_url, bound_queue, expected=total)
    bodies = [json.loads(m.body) for m in messages]
    versions = [body["resource"]["content"]["version"] for body in bodies]
    # Every committed transaction bumped the version under the row lock, so
    # version order is commit order: the events must arrive in exactly that order.
    assert versions == list(range(1, total + 1))
    assert [body["action"] for body in bodies] == ["create"] + ["update"] * (total - 1)
    assert [m.headers["outbox-resource-version"] for m in messages] == [str(v) for v in versions]
    with factory() as session:
        assert len(session.scalars(select(CaseNote)).all()) == total - 1
