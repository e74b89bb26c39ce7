"""ce-type and ce-source identify the producer by default; ce-dataschema names the body's schema."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.cli.settings import ce_source, ce_type_prefix
from outbox.envelope import validation
from outbox.relay.message import ENVELOPE_SCHEMA_URI, build_message, type_namespace
from outbox.store.rows import EventRow


@pytest.mark.parametrize(
    ("schema", "namespace"),
    [
        ("https://example.org/schemas/case", "org.example."),
        ("https://Schemas.Cases.Example.COM:8443/v1/case.json", "com.example.cases.schemas."),
        ("http://example.org./case", "org.example."),
        ("urn:example:case", ""),
        ("https://10.0.0.7/schemas/case", ""),
        ("https://[::1]/schemas/case", ""),
        ("https://[bad/case", ""),
        ("/schemas/case", ""),
        ("", ""),
    ],
)
def test_the_type_namespace_is_the_schema_host_in_reverse_dns_order(
    schema: str, namespace: str
) -> None:
    assert type_namespace(schema) == namespace


@given(st.text(max_size=300))
def test_any_schema_string_gives_a_namespace_of_dotted_labels_or_nothing(schema: str) -> None:
    namespace = type_namespace(schema)
    assert namespace == "" or (namespace.endswith(".") and "" not in namespace[:-1].split("."))


def test_the_envelope_schema_uri_is_the_shipped_schemas_id() -> None:
    assert validation.event_schema()["$id"] == ENVELOPE_SCHEMA_URI


def row(resource_type: str = "case") -> EventRow:
    return EventRow(
        position=1,
        event_id=str(uuid.uuid4()),
        ordering_key="case:1:1",
        partition=0,
        routing_key="case.update",
        resource_type=resource_type,
        payload="{}",
        headers=None,
        schema_version=None,
        created_at=dt.datetime(2026, 12, 2, tzinfo=dt.UTC),
        attempts=0,
    )


def test_headers_by_default_and_with_an_explicit_prefix() -> None:
    schema = "https://example.org/schemas/case"
    default = build_message(row(), "update", schema, source="/cases").headers
    assert default["ce-type"] == "org.example.case.update"
    assert default["ce-dataschema"] == ENVELOPE_SCHEMA_URI  # a JSON body: the envelope
    assert default["outbox-schema"] == schema  # the content's schema
    explicit = build_message(row(), "update", schema, source="/cases", type_prefix="gov.x.")
    assert explicit.headers["ce-type"] == "gov.x.case.update"
    bare = build_message(row(), "update", schema, source="/cases", type_prefix="")
    assert bare.headers["ce-type"] == "case.update"
    avro = build_message(
        row(), "update", schema, source="/cases", body=b"\xc3\x01", content_type="application/avro"
    )
    assert avro.headers["ce-dataschema"] == schema  # an Avro body is the content alone


@pytest.mark.parametrize(
    ("values", "source"),
    [
        ({"source": "auto", "database_url": "postgresql://app@db:5432/cases"}, "/cases"),
        ({"source": "auto", "database_url": "sqlite:////srv/app/cases.db"}, "/cases"),
        ({"source": "auto", "database_url": "postgresql://app@db:5432"}, "/outbox"),
        (
            {"source": "https://cases.example.org", "database_url": "sqlite://"},
            "https://cases.example.org",
        ),
    ],
)
def test_ce_source_names_the_database_unless_set(values: dict[str, str], source: str) -> None:
    assert ce_source(values) == source


def test_type_prefix_setting() -> None:
    assert ce_type_prefix({"type_prefix": "auto"}) is None
    assert ce_type_prefix({"type_prefix": "none"}) == ""
    assert ce_type_prefix({"type_prefix": "org.example.cases."}) == "org.example.cases."
