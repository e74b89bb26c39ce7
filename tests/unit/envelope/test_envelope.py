"""The envelope, its lossless content encoding and its validation (no services needed,
except the last tests, which prove that an invalid envelope writes nothing)."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import outbox
from outbox.envelope import codec, validation
from outbox.envelope.model import Action, Envelope, ResourceReference
from outbox.errors import ContentEncodingError, EnvelopeError
from outbox.store import table

SCHEMA = "https://example.org/schemas/case.json"


def test_envelope_serialises_to_exactly_the_schema_shape() -> None:
    envelope = Envelope(
        action=Action.UPDATE, schema=SCHEMA, content={"tenantId": 1, "id": 42, "title": "A"}
    )

    assert json.loads(envelope.to_json()) == {
        "action": "update",
        "resource": {"schema": SCHEMA, "content": {"tenantId": 1, "id": 42, "title": "A"}},
    }
    assert envelope.to_json() == (
        '{"action":"update","resource":{"schema":"https://example.org/schemas/case.json",'
        '"content":{"tenantId":1,"id":42,"title":"A"}}}'
    )
    validation.check_envelope(envelope.to_dict())


def test_resource_reference_serialises_as_tenant_id_id_version() -> None:
    reference = ResourceReference(tenant_id=3, id=9, version=4)
    envelope = Envelope(action="delete", schema=SCHEMA, content=reference)

    assert envelope.to_dict()["resource"]["content"] == {"tenantId": 3, "id": 9, "version": 4}
    assert envelope.reference == reference
    # A dict of exactly those three numbers is recognised as a reference too.
    as_dict = Envelope(action="delete", schema=SCHEMA, content=reference.to_dict())
    assert as_dict.reference == reference


def test_action_is_a_str_enum_and_strings_are_accepted() -> None:
    assert isinstance(Action.CREATE, str)
    assert [a.value for a in Action] == ["create", "update", "delete"]
    assert Action("update") is Action.UPDATE
    envelope = Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, "id": 1})
    assert envelope.action is Action.CREATE


def test_envelope_round_trips_through_json() -> None:
    envelope = Envelope(action="update", schema=SCHEMA, content={"tenantId": 1, "id": 2})
    assert Envelope.from_json(envelope.to_json()) == envelope


class Colour(enum.Enum):
    RED = "red"


def test_content_encoding_is_lossless_and_documented() -> None:
    aware = dt.datetime(2026, 11, 26, 20, 48, 42, 123, tzinfo=dt.UTC)
    plus_two = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    naive = dt.datetime(2026, 11, 26, 20, 48, 42, 500000)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    content = {
        "aware": aware,
        "plusTwo": plus_two,
        "naive": naive,
        "day": dt.date(2026, 2, 28),
        "id": ident,
        "amount": decimal.Decimal("12.50"),
        "tiny": decimal.Decimal("0.1000000000000000000000000001"),
        "colour": Colour.RED,
        "nested": [{"when": dt.date(2020, 1, 1)}, (1, 2)],
    }

    encoded = codec.to_jsonable(content)

    assert encoded == {
        "aware": "2026-11-26T20:48:42.000123+00:00",
        "plusTwo": "2026-01-02T03:04:05+02:00",
        "naive": "2026-11-26T20:48:42.500000",
        "day": "2026-02-28",
        "id": "12345678-1234-5678-1234-567812345678",
        "amount": "12.50",
        "tiny": "0.1000000000000000000000000001",
        "colour": "red",
        "nested": [{"when": "2020-01-01"}, [1, 2]],
    }
    # Lossless: every value parses back to exactly what was written.
    assert dt.datetime.fromisoformat(encoded["aware"]) == aware
    assert dt.datetime.fromisoformat(encoded["plusTwo"]) == plus_two
    assert dt.datetime.fromisoformat(encoded["naive"]) == naive
    assert dt.datetime.fromisoformat(encoded["naive"]).tzinfo is None
    assert uuid.UUID(encoded["id"]) == ident
    assert decimal.Decimal(encoded["tiny"]) == content["tiny"]
    # And an envelope carries exactly that encoding.
    envelope = Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, **content})
    assert json.loads(envelope.to_json())["resource"]["content"]["amount"] == "12.50"


@pytest.mark.parametrize(
    ("content", "path"),
    [
        ({"blob": b"\x00"}, "resource.content.blob"),
        ({"items": [1, {"x": object()}]}, "resource.content.items[1].x"),
        ({"ratio": float("nan")}, "resource.content.ratio"),
        ({"ratio": float("inf")}, "resource.content.ratio"),
        ({"amount": decimal.Decimal("NaN")}, "resource.content.amount"),
        ({"deep": {1: "int key"}}, "resource.content.deep"),
    ],
)
def test_unencodable_content_names_the_path(content: dict[str, Any], path: str) -> None:
    envelope = Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, "id": 1, **content})
    with pytest.raises(ContentEncodingError) as info:
        envelope.to_dict()
    assert str(info.value).startswith(f"{path}:")
    assert isinstance(info.value, EnvelopeError)


def test_bad_action_is_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="action must be one of create, update, delete"):
        Envelope(action="upsert", schema=SCHEMA, content={})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"action": "create", "resource": {"content": {}}}, "'schema' is a required property"),
        ({"action": "create", "resource": {"schema": "", "content": {}}}, "resource.schema"),
        (
            {"action": "create", "resource": {"schema": "not a uri", "content": {}}},
            "resource.schema",
        ),
        ({"action": "create", "resource": {"schema": SCHEMA, "content": [1]}}, "not of type"),
        ({"action": "create"}, "'resource' is a required property"),
        ({"action": "remove", "resource": {"schema": SCHEMA, "content": {}}}, "action"),
        (
            {"action": "create", "resource": {"schema": SCHEMA, "content": {}}, "extra": 1},
            "Additional properties",
        ),
    ],
)
def test_validation_rejects_what_the_schema_forbids(data: dict[str, Any], message: str) -> None:
    with pytest.raises(EnvelopeError, match="invalid envelope") as info:
        validation.check_envelope(data)
    assert message in str(info.value)


def test_shipped_schema_is_valid_draft_2020_12() -> None:
    schema = validation.event_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(schema)
    assert "$defs" in schema and "definitions" not in schema


def _count(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table.event)).scalar_one()


@pytest.mark.parametrize(
    "envelope_factory",
    [
        lambda: Envelope(action="create", schema="not a uri", content={"tenantId": 1, "id": 1}),
        lambda: Envelope(action="create", schema="", content={"tenantId": 1, "id": 1}),
        lambda: Envelope(action="create", schema=SCHEMA, content=[1, 2]),  # type: ignore[arg-type]
        lambda: Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, "x": b"raw"}),
        lambda: Envelope(action="create", schema=SCHEMA, content={"title": "no key"}),
    ],
    ids=["non-uri-schema", "empty-schema", "non-object-content", "bytes", "no-key"],
)
def test_invalid_envelope_is_refused_at_publish_and_nothing_is_written(
    sqlite_engine: Engine, envelope_factory: Any
) -> None:
    with Session(sqlite_engine) as session, session.begin():
        good = Envelope(action="create", schema=SCHEMA, content={"tenantId": 1, "id": 1})
        outbox.publish(session, good)
        with pytest.raises(EnvelopeError):
            outbox.publish(session, envelope_factory())
    # The valid event of the same transaction commits; the invalid one left no row.
    assert _count(sqlite_engine) == 1


def test_publish_refuses_an_invalid_envelope_on_a_connection(sqlite_engine: Engine) -> None:
    with sqlite_engine.begin() as connection, pytest.raises(EnvelopeError):
        outbox.publish(
            connection,
            Envelope(action="create", schema="nope", content={"tenantId": 1, "id": 1}),
        )
    assert _count(sqlite_engine) == 0
