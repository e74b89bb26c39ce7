"""The relay's least-privilege role relays with the shipped grants and touches nothing else."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import kombu
import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import outbox
from outbox.cli.deploy import quote_identifier, relay_role_statements
from outbox.cli.main import main
from outbox.errors import ConfigurationError, StoreError
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine
from outbox.store.privileges import RELAY_PRIVILEGES
from outbox.store.sqlstore import SqlStore
from tests.conftest import PG_ADMIN_URL, drain_queue, pg_url
from tests.paths import ROOT

SCHEMA = "https://example.org/schemas/case.json"


@pytest.fixture
def relay_role(pg_database: str) -> Iterator[str]:
    """A login role (cluster-wide, so uniquely named) with no privileges yet."""
    role = f"outbox_relay_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    yield role
    with psycopg.connect(pg_url(pg_database), autocommit=True) as owner:
        owner.execute(f"DROP OWNED BY {role}")  # its grants in the test database
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {role}")


def _as_role(database: str, role: str) -> str:
    return pg_url(database).replace("://postgres@", f"://{role}@", 1)


def test_relay_runs_with_the_granted_role_and_nothing_more(
    pg_database: str,
    pg_engine: Engine,
    relay_role: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    with pg_engine.begin() as connection:
        connection.exec_driver_sql(
            'CREATE TABLE "case" (id integer PRIMARY KEY, title text NOT NULL)'
        )
        connection.exec_driver_sql("INSERT INTO \"case\" VALUES (1, 'secret')")
    # Applied through the CLI, as an operator would (connected as the tables' owner).
    assert main(["grant-relay-role", relay_role, "--database-url", pg_url(pg_database)]) == 0

    with Session(pg_engine) as session, session.begin():
        for version in range(1, 21):
            outbox.publish(
                session,
                outbox.Envelope(
                    action="update", schema=SCHEMA, content={"tenantId": 1, "id": 7, "v": version}
                ),
            )

    engine = create_outbox_engine(_as_role(pg_database, relay_role))
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT current_user").scalar_one() == relay_role
        # Readiness reads the migration revision.
        assert migrate.current_revision(engine) == migrate.head_revision(engine)

        store = SqlStore(engine)
        relay = Relay(store, open_publisher(amqp_url, exchange_name), RelaySettings(batch_size=8))
        assert relay.drain(timeout=30) == 20
        bodies = [json.loads(m.body) for m in drain_queue(amqp_url, bound_queue, expected=20)]
        assert [b["resource"]["content"]["v"] for b in bodies] == list(range(1, 21))
        assert store.counts()["delivered"] == 20
        assert store.partitions()  # status works too

        # Delete on delivery (retention zero) is allowed as well.
        with Session(pg_engine) as session, session.begin():
            outbox.publish(
                session,
                outbox.Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, "id": 8}),
            )
        deleting = Relay(
            store,
            open_publisher(amqp_url, exchange_name),
            RelaySettings(delete_on_delivery=True),
        )
        assert deleting.drain(timeout=30) == 1
        assert store.counts()["pending"] == 0
    finally:
        engine.dispose()

    # ... and nothing else.
    forbidden = [
        'SELECT * FROM "case"',
        "INSERT INTO \"case\" VALUES (2, 'x')",
        "UPDATE \"case\" SET title = 'x'",
        'DELETE FROM "case"',
        "CREATE TABLE relay_was_here (id integer)",
        "DROP TABLE outbox_event",
        "TRUNCATE outbox_event",
        "ALTER TABLE outbox_event ADD COLUMN x integer",
        # Producers write events, the relay never does.
        "INSERT INTO outbox_event (event_id, ordering_key, partition, routing_key, "
        "resource_type, payload) VALUES (gen_random_uuid(), 'k', 0, 'r', 't', '{}')",
        "DELETE FROM outbox_alembic_version",
        "INSERT INTO outbox_schema (uri, version, format, document, fingerprint) "
        "VALUES ('u', 1, 'jsonschema', '{}', 'f')",
        "SELECT * FROM outbox_dead_audit",
    ]
    with psycopg.connect(_as_role(pg_database, relay_role), autocommit=True) as connection:
        for statement in forbidden:
            with pytest.raises(pg_errors.InsufficientPrivilege):
                connection.execute(statement)
    with pg_engine.connect() as connection:
        assert connection.execute(text('SELECT title FROM "case"')).scalar_one() == "secret"


def test_migrate_as_the_relay_role_is_refused(empty_pg_database: str, relay_role: str) -> None:
    engine = create_outbox_engine(_as_role(empty_pg_database, relay_role))
    try:
        with pytest.raises(StoreError, match="permission denied"):
            migrate_or_store_error(engine)
    finally:
        engine.dispose()


def migrate_or_store_error(engine: Engine) -> None:
    from outbox.cli.common import as_store_error

    try:
        migrate.upgrade(engine)
    except Exception as exc:
        raise as_store_error(exc) from None


def test_role_names_are_quoted_in_the_grants() -> None:
    statements = relay_role_statements('odd "name"; DROP TABLE x -- y')
    assert statements[0] == (
        'GRANT SELECT, UPDATE, DELETE ON outbox_event TO "odd ""name""; DROP TABLE x -- y"'
    )
    assert all(s.startswith("GRANT ") for s in statements)
    assert len(statements) == 5
    for bad in ("", "x" * 64, "a\x00b"):
        with pytest.raises(ConfigurationError):
            quote_identifier(bad)


def test_the_shipped_sql_grants_exactly_the_relay_privileges() -> None:
    """relay_role.sql and RELAY_PRIVILEGES (what `outbox check` verifies) are one list."""
    root = ROOT
    shipped = (root / "outbox" / "store" / "sql" / "relay_role.sql").read_text("utf-8")
    body = re.sub(r"--[^\n]*", "", shipped)
    granted: dict[str, set[str]] = {}
    for statement in filter(None, (s.strip() for s in body.split(";"))):
        match = re.fullmatch(r'GRANT ([A-Z, ]+) ON (\w+) TO :"role"', statement)
        assert match is not None, f"not a GRANT of the expected form: {statement!r}"
        privileges = {p.strip() for p in match[1].split(",")}
        assert match[2] not in granted, f"{match[2]} is granted twice"
        granted[match[2]] = privileges
    assert granted == {name: set(p) for name, p in RELAY_PRIVILEGES.items()}


def test_security_page_shows_the_shipped_grants() -> None:
    root = ROOT
    page = (root / "docs" / "security.md").read_text("utf-8")
    shipped = (root / "outbox" / "store" / "sql" / "relay_role.sql").read_text("utf-8")
    grants = [line for line in shipped.splitlines() if line.startswith("GRANT ")]
    block = page.split("```sql\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == grants
