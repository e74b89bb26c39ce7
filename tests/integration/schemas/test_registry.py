"""The schema registry on PostgreSQL: registration, versions, the CLI, producer-side
and relay-side validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import kombu
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox.cli import settings as config
from outbox.cli.main import main
from outbox.cli.runner import build_relay
from outbox.errors import ContentValidationError, SchemaError
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.schemas.registry import SchemaRegistry, content_validator, relay_hooks
from outbox.store import table
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue

CASE_URI = "https://example.org/schemas/case"
CASE_V1: dict[str, Any] = {
    "$id": CASE_URI,
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["tenantId", "id"],
    "properties": {
        "tenantId": {"type": "integer"},
        "id": {"type": "integer"},
        "title": {"type": "string"},
    },
}
CASE_V2: dict[str, Any] = {
    **CASE_V1,
    "properties": {**CASE_V1["properties"], "priority": {"type": "integer", "default": 3}},
    "required": ["tenantId", "id", "priority"],
}
NOTE_AVSC: dict[str, Any] = {
    "$id": "https://example.org/schemas/note",
    "type": "record",
    "name": "Note",
    "namespace": "org.example",
    "fields": [
        {"name": "tenantId", "type": "long"},
        {"name": "id", "type": "long"},
        {"name": "text", "type": "string"},
    ],
}


def write(path: Path, document: Any) -> str:
    path.write_text(json.dumps(document, indent=2), "utf-8")
    return str(path)


def schema_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        S = table.schema
        return list(connection.execute(select(S).order_by(S.c.uri, S.c.version)))


def event_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        E = table.event
        return list(connection.execute(select(E).order_by(E.c.position)))


def case(content: dict[str, Any], schema: str = CASE_URI) -> outbox.Envelope:
    return outbox.Envelope(action="update", schema=schema, content=content)


# -- registration ------------------------------------------------------------------------


def test_register_is_idempotent_and_a_changed_document_is_a_new_version(pg_engine: Engine) -> None:
    registry = SchemaRegistry(pg_engine)
    first = registry.register(CASE_URI, CASE_V1)
    again = registry.register(CASE_URI, json.dumps(CASE_V1))  # JSON text is accepted too
    second = registry.register(CASE_URI, CASE_V2)

    assert (first.version, again.version, second.version) == (1, 1, 2)
    assert first.fingerprint == again.fingerprint != second.fingerprint
    rows = schema_rows(pg_engine)
    assert [(r.uri, r.version, r.format) for r in rows] == [
        (CASE_URI, 1, "jsonschema"),
        (CASE_URI, 2, "jsonschema"),
    ]
    assert all(r.registered_at is not None for r in rows)
    # Another process's registry sees both; the latest is version 2.
    other = SchemaRegistry(pg_engine)
    assert other.get(CASE_URI).version == 2
    assert other.get(CASE_URI + "/1").document == CASE_V1
    assert other.get(CASE_URI, 1).fingerprint == first.fingerprint


def test_avro_fingerprint_is_sha256_of_the_parsing_canonical_form(pg_engine: Engine) -> None:
    import hashlib

    from fastavro.schema import to_parsing_canonical_form

    registry = SchemaRegistry(pg_engine)
    note = registry.register(NOTE_AVSC["$id"], NOTE_AVSC)
    expected = hashlib.sha256(to_parsing_canonical_form(NOTE_AVSC).encode()).hexdigest()
    assert note.format == "avro"
    assert note.fingerprint == expected
    # A doc string changes the document (a new version) but not the canonical form.
    documented = {**NOTE_AVSC, "doc": "A note on a case"}
    assert registry.register(NOTE_AVSC["$id"], documented).fingerprint == expected


def test_a_version_registered_elsewhere_is_found_on_a_miss(pg_engine: Engine) -> None:
    producer_side = SchemaRegistry(pg_engine, max_age=3600, miss_interval=0)
    assert producer_side.resolve(CASE_URI) is None
    SchemaRegistry(pg_engine).register(CASE_URI, CASE_V1)
    found = producer_side.resolve(CASE_URI)
    assert found is not None and found.version == 1


def test_cli_registers_lists_shows_and_refuses(
    pg_url_fixture: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ["--database-url", pg_url_fixture]
    case_file = write(tmp_path / "case.json", CASE_V1)
    note_file = write(tmp_path / "note.avsc", NOTE_AVSC)

    assert main(["schemas", "register", case_file, note_file, *db]) == 0
    out = capsys.readouterr().out
    assert f"registered {CASE_URI} version 1 (jsonschema)" in out
    assert "registered https://example.org/schemas/note version 1 (avro)" in out

    assert main(["schemas", "register", case_file, *db]) == 0
    assert f"unchanged {CASE_URI} version 1" in capsys.readouterr().out

    # A new required property without a default breaks backward compatibility.
    broken = {**CASE_V1, "required": ["tenantId", "id", "title"]}
    assert main(["schemas", "register", write(tmp_path / "case2.json", broken), *db]) == 1
    err = capsys.readouterr().err
    assert "refused" in err
    assert "title: property 'title' became required without a default" in err
    assert "(rule required-without-default)" in err

    # ... unless the compatibility check is turned off.
    assert (
        main(
            [
                "schemas",
                "register",
                str(tmp_path / "case2.json"),
                "--schema-compatibility",
                "none",
                *db,
            ]
        )
        == 0
    )
    capsys.readouterr()

    # --uri overrides $id; it names a single file.
    other = write(tmp_path / "other.json", {"type": "object"})
    assert main(["schemas", "register", other, "--uri", "urn:example:other", *db]) == 0
    assert main(["schemas", "register", other, case_file, "--uri", "urn:x", *db]) == 2
    assert "--uri names one schema" in capsys.readouterr().err

    assert main(["schemas", "list", "--json", *db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["uri"], s["version"], s["format"]) for s in listed] == [
        (CASE_URI, 2, "jsonschema"),
        ("https://example.org/schemas/note", 1, "avro"),
        ("urn:example:other", 1, "jsonschema"),
    ]
    assert main(["schemas", "list", "--all", *db]) == 0
    assert capsys.readouterr().out.count(CASE_URI) == 2

    assert main(["schemas", "show", CASE_URI + "/1", *db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["document"] == CASE_V1

    assert main(["schemas", "show", "urn:nope", *db]) == 1
    assert "schema urn:nope is not registered" in capsys.readouterr().err

    missing = str(tmp_path / "missing.json")
    assert main(["schemas", "register", missing, *db]) == 1
    assert "cannot read" in capsys.readouterr().err


# -- producer-side validation -------------------------------------------------------------


@pytest.fixture
def registry(pg_engine: Engine) -> SchemaRegistry:
    registry = SchemaRegistry(pg_engine)
    registry.register(CASE_URI, CASE_V1)
    return registry


def factory(engine: Engine, **options: Any) -> sessionmaker[Session]:
    sessions = sessionmaker(engine)
    outbox.configure(sessions, outbox.ProducerOptions(**options))
    return sessions


def test_valid_content_records_the_version_it_was_validated_against(
    pg_engine: Engine, registry: SchemaRegistry
) -> None:
    sessions = factory(pg_engine, schemas=registry)
    with sessions() as session, session.begin():
        outbox.publish(session, case({"tenantId": 1, "id": 1, "title": "v1"}))
    registry.register(CASE_URI, CASE_V2)
    with sessions() as session, session.begin():
        outbox.publish(session, case({"tenantId": 1, "id": 1, "priority": 1}))
        outbox.publish(session, case({"tenantId": 1, "id": 1}, schema=CASE_URI + "/1"))
    with pg_engine.begin() as connection:  # a Connection is validated the same way
        outbox.configure(connection, outbox.ProducerOptions(schemas=registry))
        outbox.publish(connection, case({"tenantId": 1, "id": 2, "priority": 2}))

    assert [r.schema_version for r in event_rows(pg_engine)] == [1, 2, 1, 2]


def test_invalid_content_raises_before_commit_with_the_field_path(
    pg_engine: Engine, registry: SchemaRegistry
) -> None:
    sessions = factory(pg_engine, schemas=registry)
    with sessions() as session, session.begin():
        with pytest.raises(ContentValidationError) as invalid:
            outbox.publish(session, case({"tenantId": 1, "id": 1, "title": 42}))
        outbox.publish(session, case({"tenantId": 1, "id": 2}))
    assert str(invalid.value) == (
        f"content does not match {CASE_URI} version 1: title: 42 is not of type 'string'"
    )
    missing_id = r"\(root\): 'id' is a required property"
    with (
        pytest.raises(ContentValidationError, match=missing_id),
        sessions() as session,
        session.begin(),
    ):
        outbox.publish(session, case({"tenantId": 1}))
    assert [json.loads(r.payload)["resource"]["content"]["id"] for r in event_rows(pg_engine)] == [
        2
    ]


def test_unregistered_uri_is_accepted_and_logged_once_or_refused_when_strict(
    pg_engine: Engine, registry: SchemaRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = "https://example.org/schemas/unknown"
    sessions = factory(pg_engine, schemas=registry)
    with (
        caplog.at_level(logging.WARNING, logger="outbox.schemas.registry"),
        sessions() as session,
        session.begin(),
    ):
        for i in range(3):
            outbox.publish(session, case({"tenantId": 1, "id": i}, schema=unknown))
    warnings = [r for r in caplog.records if getattr(r, "outbox_fields", {}).get("uri") == unknown]
    assert len(warnings) == 1
    assert warnings[0].outbox_fields["event"] == "schema_unregistered"  # type: ignore[attr-defined]

    strict = factory(pg_engine, schemas=registry, strict=True)
    refused = r"is not registered \(strict schemas are on\)"
    with (
        pytest.raises(ContentValidationError, match=refused),
        strict() as session,
        session.begin(),
    ):
        outbox.publish(session, case({"tenantId": 1, "id": 9}, schema=unknown))
    assert [r.schema_version for r in event_rows(pg_engine)] == [None, None, None]


def test_validation_can_be_turned_off(pg_engine: Engine, registry: SchemaRegistry) -> None:
    with factory(pg_engine, schemas=registry, validate=False)() as session, session.begin():
        outbox.publish(session, case({"tenantId": 1, "id": 1, "title": 42}))
    (row,) = event_rows(pg_engine)
    assert row.schema_version is None


# -- relay-side validation ----------------------------------------------------------------


def test_relay_marks_invalid_rows_dead_and_holds_their_key(
    pg_engine: Engine,
    registry: SchemaRegistry,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    pg_url_fixture: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Written by code that does not validate (or before the schema changed).
    with factory(pg_engine, validate=False)() as session, session.begin():
        outbox.publish(session, case({"tenantId": 1, "id": 1, "title": "ok"}))
        outbox.publish(session, case({"tenantId": 1, "id": 1, "title": ["not", "a", "string"]}))
        outbox.publish(session, case({"tenantId": 1, "id": 1, "title": "held behind it"}))
        outbox.publish(session, case({"tenantId": 1, "id": 2, "title": "other key"}))

    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        RelaySettings(),
        content_validator=content_validator(registry),
    )
    assert relay.drain(timeout=30) == 2
    titles = [
        json.loads(m.body)["resource"]["content"]["title"]
        for m in drain_queue(amqp_url, bound_queue, expected=2)
    ]
    assert titles == ["ok", "other key"]
    states = [(r.state, r.last_error) for r in event_rows(pg_engine)]
    assert states[0] == ("delivered", None)
    assert states[1][0] == "dead"
    assert states[1][1] == (
        f"content does not match {CASE_URI} version 1: "
        "title: ['not', 'a', 'string'] is not of type 'string'"
    )
    assert states[2] == ("pending", None)  # held behind the dead row of its key
    assert states[3] == ("delivered", None)

    assert main(["status", "--json", "--database-url", pg_url_fixture]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["dead"], status["held_keys"], status["pending"]) == (1, 1, 1)


def test_relay_checks_rows_against_the_version_they_recorded(
    pg_engine: Engine,
    registry: SchemaRegistry,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    with factory(pg_engine, schemas=registry)() as session, session.begin():
        outbox.publish(session, case({"tenantId": 1, "id": 1}))  # valid under v1
    # v2 requires priority (with a default): the v1 row stays valid for the relay.
    registry.register(CASE_URI, CASE_V2)
    validator = content_validator(SchemaRegistry(pg_engine), strict=True)
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        content_validator=validator,
    )
    assert relay.drain(timeout=30) == 1
    (message,) = drain_queue(amqp_url, bound_queue, expected=1)
    assert message.headers["outbox-schema-version"] == 1
    assert message.headers["outbox-schema"] == CASE_URI


def test_strict_relay_marks_unregistered_schemas_dead(
    pg_engine: Engine, amqp_url: str, exchange_name: str
) -> None:
    with factory(pg_engine)() as session, session.begin():
        outbox.publish(
            session, case({"tenantId": 1, "id": 1}, schema="https://example.org/x/unknown")
        )
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(amqp_url, exchange_name),
        **relay_hooks(pg_engine, strict=True),
    )
    assert relay.drain(timeout=30) == 0
    (row,) = event_rows(pg_engine)
    assert row.state == "dead"
    assert (
        row.last_error
        == "schema https://example.org/x/unknown is not registered (strict schemas are on)"
    )


def test_runner_wires_validation_behind_its_settings(pg_url_fixture: str, amqp_url: str) -> None:
    values = {
        "database_url": pg_url_fixture,
        "broker_url": amqp_url,
        "exchange": "outbox-test-unused",
        "batch_size": 10,
        "poll_interval": 1.0,
        "lease_ttl": 15.0,
        "confirm_timeout": 5.0,
        "unroutable": "retry",
        "source": "/test",
        "validate_content": True,
        "strict_schemas": False,
        "body_format": "avro",
    }
    for overrides, validator, encoder in [
        ({}, True, True),
        ({"validate_content": False, "body_format": "json"}, False, False),
    ]:
        relay = build_relay(config.load({**values, **overrides}, "relay", environ={}))
        try:
            assert (relay.content_validator is not None) is validator
            assert (relay.body_encoder is not None) is encoder
        finally:
            relay.publisher.close()
            relay.store.engine.dispose()


def test_schema_errors_are_outbox_errors() -> None:
    registry = SchemaRegistry()
    with pytest.raises(SchemaError):
        registry.get("urn:none")
    assert isinstance(SchemaError("x"), outbox.OutboxError)


def test_database_errors_become_store_errors(empty_pg_database: str) -> None:
    from outbox.errors import SchemaNotMigrated, StoreUnavailable
    from outbox.store.engine import create_outbox_engine
    from tests.conftest import pg_url

    unmigrated = create_outbox_engine(pg_url(empty_pg_database))
    unreachable = create_outbox_engine("postgresql://postgres:secret@127.0.0.1:9/none")
    try:
        with pytest.raises(SchemaNotMigrated, match="run `outbox migrate`"):
            SchemaRegistry(unmigrated).resolve(CASE_URI)
        with pytest.raises(SchemaNotMigrated):
            SchemaRegistry(unmigrated).register(CASE_URI, CASE_V1)
        with pytest.raises(StoreUnavailable) as down:
            SchemaRegistry(unreachable).resolve(CASE_URI)
        assert "secret" not in str(down.value)
    finally:
        unmigrated.dispose()
        unreachable.dispose()


def test_concurrent_registrations_of_one_document_make_one_version(pg_engine: Engine) -> None:
    import threading

    barrier = threading.Barrier(4)
    results: list[int] = []
    errors: list[BaseException] = []

    def register() -> None:
        registry = SchemaRegistry(pg_engine)
        barrier.wait()
        try:
            results.append(registry.register(CASE_URI, CASE_V1).version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [1, 1, 1, 1]
    assert [(r.uri, r.version) for r in schema_rows(pg_engine)] == [(CASE_URI, 1)]


def test_local_files_need_a_uri(tmp_path: Path) -> None:
    nameless = write(tmp_path / "nameless.json", {"type": "object"})
    with pytest.raises(SchemaError, match="no URI: give one"):
        SchemaRegistry.from_files(nameless)
    broken = tmp_path / "broken.avsc"
    broken.write_text("{not json", "utf-8")
    with pytest.raises(SchemaError, match=r"broken\.avsc: not valid JSON"):
        SchemaRegistry.from_files(broken)
    local = SchemaRegistry.from_files(write(tmp_path / "note.avsc", NOTE_AVSC))
    assert local.get("https://example.org/schemas/note").format == "avro"
