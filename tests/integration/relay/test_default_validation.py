"""Content is validated at publish by default, against the registry in the outbox's own database.

No ``outbox.configure`` here: a service that registered its schemas (``outbox
schemas register`` at deploy) gets invalid content refused before commit,
through ``publish`` and through the session hooks, on PostgreSQL and SQLite.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox.errors import ContentValidationError, ResourceContentError, StoreError
from outbox.schemas.registry import SchemaRegistry
from outbox.store import table
from outbox.store.engine import create_outbox_engine
from tests.conftest import PG_ADMIN_URL, pg_url
from tests.hooks_models import CASE_SCHEMA, Base, Case

CASE_URI = "https://example.org/schemas/case"
CASE: dict[str, Any] = {
    "$id": CASE_URI,
    "type": "object",
    "required": ["tenantId", "id"],
    "properties": {"tenantId": {"type": "integer"}, "title": {"type": "string"}},
}
# The content the session hooks serialise a Case to: its title must be short.
HOOKED_CASE: dict[str, Any] = {
    "$id": CASE_SCHEMA,
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 10}},
}


def envelope(content: dict[str, Any], schema: str = CASE_URI) -> outbox.Envelope:
    return outbox.Envelope(action="update", schema=schema, content=content)


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(table.event).order_by(table.event.c.position)))


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    engine: Engine = request.getfixturevalue(
        f"{'pg' if request.param == 'postgresql' else 'sqlite'}_engine"
    )
    yield engine


def test_publish_refuses_invalid_content_without_any_configuration(engine: Engine) -> None:
    SchemaRegistry(engine).register(CASE_URI, CASE)  # as `outbox schemas register` does
    sessions = sessionmaker(engine)
    invalid_title = "title: 42 is not of type 'string'"
    with (
        pytest.raises(ContentValidationError, match=invalid_title),
        sessions() as session,
        session.begin(),
    ):
        outbox.publish(session, envelope({"tenantId": 1, "id": 1, "title": 42}))
    # A Connection the same way.
    with (
        pytest.raises(ContentValidationError, match="'id' is a required property"),
        engine.begin() as connection,
    ):
        outbox.publish(connection, envelope({"tenantId": 1}))
    with sessions() as session, session.begin():
        outbox.publish(session, envelope({"tenantId": 1, "id": 2, "title": "fine"}))
    (row,) = rows(engine)
    assert json.loads(row.payload)["resource"]["content"]["id"] == 2
    assert row.schema_version == 1  # the version it was validated against


def test_the_session_hooks_refuse_invalid_content_and_the_change_rolls_back(
    engine: Engine,
) -> None:
    Base.metadata.create_all(engine)
    SchemaRegistry(engine).register(CASE_SCHEMA, HOOKED_CASE)
    sessions = outbox.instrument(sessionmaker(engine))
    with (
        pytest.raises(ResourceContentError, match="is too long"),
        sessions() as session,
        session.begin(),
    ):
        session.add(Case(tenant_id=1, id=1, title="much longer than ten"))
    with sessions() as session, session.begin():
        session.add(Case(tenant_id=1, id=2, title="short"))
    with sessions() as session:
        assert [c.id for c in session.scalars(select(Case))] == [2]
    assert [r.schema_version for r in rows(engine)] == [1]


def test_validation_off_is_one_switch(engine: Engine) -> None:
    SchemaRegistry(engine).register(CASE_URI, CASE)
    sessions = sessionmaker(engine)
    outbox.configure(sessions, outbox.ProducerOptions(validate=False))
    with sessions() as session, session.begin():
        outbox.publish(session, envelope({"tenantId": 1, "id": 1, "title": 42}))
    assert [r.schema_version for r in rows(engine)] == [None]


def test_the_registry_is_read_through_the_session_connection(pg_url_fixture: str) -> None:
    """A pool of one connection, held by the session: a second checkout would time out."""
    engine = create_outbox_engine(pg_url_fixture, pool_size=1, max_overflow=0, pool_timeout=1)
    try:
        SchemaRegistry(engine).register(CASE_URI, CASE)
        with Session(engine) as session, session.begin():
            session.connection()  # the only connection is now the session's
            with pytest.raises(ContentValidationError):
                outbox.publish(session, envelope({"tenantId": 1, "id": 1, "title": 42}))
    finally:
        engine.dispose()


def test_a_schema_registered_later_is_enforced_without_a_restart(engine: Engine) -> None:
    sessions = sessionmaker(engine)
    with sessions() as session, session.begin():  # unknown URI: accepted, logged once
        outbox.publish(session, envelope({"tenantId": 1, "id": 1, "title": 42}))
    SchemaRegistry(engine).register(CASE_URI, CASE)  # by another process, at a deploy
    time.sleep(1.1)  # the registry reloads after a miss at most once a second
    with pytest.raises(ContentValidationError), sessions() as session, session.begin():
        outbox.publish(session, envelope({"tenantId": 1, "id": 2, "title": 42}))
    assert len(rows(engine)) == 1


def test_a_producer_role_that_cannot_read_the_registry_fails_loudly(
    pg_database: str, pg_engine: Engine
) -> None:
    """Validation is never skipped silently: without SELECT on outbox_schema, publish raises."""
    SchemaRegistry(pg_engine).register(CASE_URI, CASE)
    role = f"outbox_producer_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    producer = create_outbox_engine(pg_url(pg_database).replace("://postgres@", f"://{role}@"))
    try:
        with psycopg.connect(pg_url(pg_database), autocommit=True) as owner:
            owner.execute(f"GRANT INSERT, SELECT (position) ON outbox_event TO {role}")
            owner.execute(f"GRANT SELECT ON outbox_partition TO {role}")
            owner.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
        valid = envelope({"tenantId": 1, "id": 1, "title": "fine"})
        with (
            pytest.raises(StoreError, match="permission denied for table outbox_schema"),
            Session(producer) as session,
            session.begin(),
        ):
            outbox.publish(session, valid)
        unchecked = sessionmaker(producer)
        outbox.configure(unchecked, outbox.ProducerOptions(validate=False))
        with unchecked() as session, session.begin():
            outbox.publish(session, valid)
        with psycopg.connect(pg_url(pg_database), autocommit=True) as owner:
            owner.execute(f"GRANT SELECT ON outbox_schema TO {role}")  # the documented grants
        with Session(producer) as session, session.begin():
            outbox.publish(session, valid)
        assert [r.schema_version for r in rows(pg_engine)] == [None, 1]
    finally:
        producer.dispose()
        with psycopg.connect(pg_url(pg_database), autocommit=True) as owner:
            owner.execute(f"DROP OWNED BY {role}")
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")
