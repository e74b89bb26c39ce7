"""``outbox.publish`` writes exactly with the producer's transaction, on PostgreSQL and SQLite."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import outbox
from outbox.envelope import ordering
from outbox.envelope.model import Envelope, ResourceReference
from outbox.store import table

SCHEMA = "https://example.org/schemas/case.json"


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest) -> Engine:
    fixture = "pg_engine" if request.param == "postgresql" else "sqlite_engine"
    result: Engine = request.getfixturevalue(fixture)
    return result


def case(case_id: int, action: str = "update", **extra: Any) -> Envelope:
    return Envelope(action=action, schema=SCHEMA, content={"tenantId": 1, "id": case_id, **extra})


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(table.event).order_by(table.event.c.position)))


def case_ids(engine: Engine) -> list[int]:
    return [json.loads(r.payload)["resource"]["content"]["id"] for r in rows(engine)]


def test_event_commits_with_the_session_transaction(engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        event_id = outbox.publish(session, case(1))
        assert rows(engine) == []  # nothing is visible before the commit
        session.commit()

    (row,) = rows(engine)
    assert isinstance(event_id, uuid.UUID)
    assert row.event_id == event_id
    assert row.state == table.PENDING
    assert row.attempts == 0
    assert row.created_at is not None
    assert json.loads(row.payload) == case(1).to_dict()


def test_rolled_back_transaction_writes_no_row(engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        outbox.publish(session, case(1))
        outbox.flush_events(session)  # even an already-written row goes with the rollback
        outbox.publish(session, case(2))
        session.rollback()
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(3))

    assert case_ids(engine) == [3]


def test_rolled_back_savepoint_discards_exactly_its_events(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(1))
        savepoint = session.begin_nested()
        outbox.publish(session, case(2))
        outbox.publish(session, case(3))
        savepoint.rollback()
        outbox.publish(session, case(4))

    assert case_ids(engine) == [1, 4]


def test_rolled_back_savepoint_after_a_flush_discards_its_written_events(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(1))
        with pytest.raises(RuntimeError), session.begin_nested():
            outbox.publish(session, case(2))
            outbox.flush_events(session)
            raise RuntimeError("undo the savepoint")
        outbox.publish(session, case(3))

    assert case_ids(engine) == [1, 3]


def test_released_savepoint_keeps_its_events(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        with session.begin_nested():
            outbox.publish(session, case(1))
            with session.begin_nested():
                outbox.publish(session, case(2))
        inner_rolled_back = session.begin_nested()
        outbox.publish(session, case(3))
        inner_rolled_back.rollback()

    assert case_ids(engine) == [1, 2]


def test_publish_with_a_connection_writes_in_its_transaction(engine: Engine) -> None:
    with engine.begin() as connection:
        kept = outbox.publish(connection, case(1))
    with engine.connect() as connection:
        transaction = connection.begin()
        outbox.publish(connection, case(2))
        transaction.rollback()

    (row,) = rows(engine)
    assert row.event_id == kept


def test_default_key_routing_key_and_partition(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(42, action="create", title="x"))
        outbox.publish(
            session,
            Envelope(
                action="delete",
                schema=SCHEMA,
                content=ResourceReference(tenant_id=7, id=8, version=3),
            ),
        )
        outbox.publish(session, case(43), key="custom-key", resource_type="ticket")

    created, deleted, custom = rows(engine)
    assert (created.ordering_key, created.routing_key, created.resource_type) == (
        "case:1:42",
        "case.create",
        "case",
    )
    assert (deleted.ordering_key, deleted.routing_key) == ("case:7:8", "case.delete")
    assert deleted.headers == {"outbox-resource-version": "3"}
    assert (custom.ordering_key, custom.routing_key) == ("custom-key", "ticket.update")
    for row in (created, deleted, custom):
        assert row.partition == ordering.partition_of(row.ordering_key, table.DEFAULT_PARTITIONS)
    # The partition is a stable hash of the key, the same in every process.
    assert ordering.key_hash("case:1:42") == int.from_bytes(
        __import__("hashlib").blake2b(b"case:1:42", digest_size=4).digest(), "big"
    )


def test_resource_type_comes_from_the_schema_uri() -> None:
    assert ordering.default_resource_type("https://example.org/schemas/case.json") == "case"
    assert ordering.default_resource_type("https://example.org/schemas/case/2") == "case"
    assert ordering.default_resource_type("https://example.org/person.schema.json") == "person"


def test_many_events_in_one_transaction_keep_their_order(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        ids = [outbox.publish(session, case(n % 3, version=n)) for n in range(30)]

    assert [r.event_id for r in rows(engine)] == ids


def test_outer_events_survive_a_rolled_back_savepoint_that_wrote_them(engine: Engine) -> None:
    # Releasing the inner SAVEPOINT writes every buffered row, including the
    # one published before the outer SAVEPOINT began; rolling the outer one
    # back undoes that write, yet the event belongs to the root transaction.
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(1))
        outer = session.begin_nested()
        with session.begin_nested():
            outbox.publish(session, case(2))
        outer.rollback()
        outbox.publish(session, case(3))

    assert case_ids(engine) == [1, 3]


def test_first_event_published_inside_a_savepoint_goes_with_it(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        outer = session.begin_nested()
        session.begin_nested()
        outbox.publish(session, case(1))  # the session's first event: inside two savepoints
        outer.rollback()
        outbox.publish(session, case(2))

    assert case_ids(engine) == [2]


def test_an_event_without_headers_stores_sql_null(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(1))
    with engine.connect() as connection:
        is_null = connection.execute(select(table.event.c.headers.is_(None))).scalar_one()
    assert is_null is True  # not the JSON text 'null'


def test_payload_keeps_integers_beyond_64_bits_exact(engine: Engine) -> None:
    # orjson refuses them; the stdlib encoder takes over.
    content = {"big": 2**70, "small": 1e-7, "text": "ü"}
    with Session(engine) as session, session.begin():
        outbox.publish(session, case(1, **content))
    (row,) = rows(engine)
    stored = json.loads(row.payload)["resource"]["content"]
    assert stored == {"tenantId": 1, "id": 1, **content}
    assert "1180591620717411303424" in row.payload  # exact, not a float
    assert "ü" in row.payload  # not escaped
