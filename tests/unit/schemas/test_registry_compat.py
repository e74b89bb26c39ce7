"""Every compatibility rule the registry claims, with a good and a bad example each.

Pure schema logic (an in-memory registry): no database needed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from outbox.errors import SchemaError
from outbox.schemas.registry import SchemaRegistry

URI = "https://example.org/schemas/case"

STATUS = {"type": "enum", "name": "Status", "symbols": ["OPEN", "CLOSED"]}
CASE: dict[str, Any] = {
    "type": "record",
    "name": "Case",
    "namespace": "org.example",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "count", "type": "int"},
        {"name": "status", "type": STATUS},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
    ],
}


def changed(edit: Callable[[dict[str, Any]], None], base: dict[str, Any] = CASE) -> dict[str, Any]:
    document = copy.deepcopy(base)
    edit(document)
    return document


def field(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f for f in document["fields"] if f["name"] == name)
    return found


def drop(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["fields"].remove(field(d, name))


def add(new_field: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["fields"].append(new_field)


def retype(name: str, new_type: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: field(d, name).__setitem__("type", new_type)


def register_pair(old: Any, new: Any, mode: str) -> int:
    registry = SchemaRegistry(compatibility=mode)
    registry.register(URI, old)
    return registry.register(URI, new).version


# (case id, mode, new schema, offending path, rule) -- the bad examples.
AVRO_BAD = [
    (
        "added-field-without-default",
        "backward",
        changed(add({"name": "title", "type": "string"})),
        "Case.title",
        "field-missing-without-default",
    ),
    (
        "removed-field-without-default-forward",
        "forward",
        changed(drop("count")),
        "Case.count",
        "field-missing-without-default",
    ),
    (
        "removed-field-without-default-full",
        "full",
        changed(drop("id")),
        "Case.id",
        "field-missing-without-default",
    ),
    (
        "long-to-int",
        "backward",
        changed(retype("id", "int")),
        "Case.id",
        "type-changed",
    ),
    (
        "int-to-long-read-by-old",
        "forward",
        changed(retype("count", "long")),
        "Case.count",
        "type-changed",
    ),
    (
        "int-to-string",
        "backward",
        changed(retype("count", "string")),
        "Case.count",
        "type-changed",
    ),
    (
        "enum-symbol-removed",
        "backward",
        changed(retype("status", {**STATUS, "symbols": ["OPEN"]})),
        "Case.status",
        "enum-symbol-missing",
    ),
    (
        "enum-symbol-added-read-by-old",
        "forward",
        changed(retype("status", {**STATUS, "symbols": ["OPEN", "CLOSED", "HELD"]})),
        "Case.status",
        "enum-symbol-missing",
    ),
    (
        "union-branch-removed",
        "backward",
        changed(lambda d: field(d, "note").update(type=["string", "long"], default="")),
        "Case.note",
        "union-branch-missing",
    ),
    (
        "array-items-narrowed",
        "backward",
        changed(retype("tags", {"type": "array", "items": "int"})),
        "Case.tags[]",
        "type-changed",
    ),
    (
        "record-renamed",
        "backward",
        changed(lambda d: d.__setitem__("name", "Ticket")),
        "(root)",
        "name-changed",
    ),
]


@pytest.mark.parametrize(
    ("case", "mode", "new", "path", "rule"), AVRO_BAD, ids=[c[0] for c in AVRO_BAD]
)
def test_incompatible_avro_version_is_refused_naming_field_and_rule(
    case: str, mode: str, new: dict[str, Any], path: str, rule: str
) -> None:
    with pytest.raises(SchemaError) as refused:
        register_pair(CASE, new, mode)
    message = str(refused.value)
    assert f"{path}:" in message, (case, message)
    assert f"(rule {rule})" in message, (case, message)
    assert f"under {mode} compatibility" in message


AVRO_GOOD = [
    (
        "added-field-with-default",
        "full",
        changed(add({"name": "t", "type": "string", "default": ""})),
    ),
    ("removed-field-backward", "backward", changed(drop("count"))),
    ("removed-field-with-default-forward", "forward", changed(drop("note"))),
    ("int-to-long", "backward", changed(retype("count", "long"))),
    ("int-to-double", "backward", changed(retype("count", "double"))),
    ("string-to-bytes", "full", changed(retype("tags", {"type": "array", "items": "bytes"}))),
    (
        "enum-symbol-added",
        "backward",
        changed(retype("status", {**STATUS, "symbols": ["OPEN", "CLOSED", "HELD"]})),
    ),
    (
        "enum-symbol-removed-with-reader-default",
        "backward",
        changed(retype("status", {**STATUS, "symbols": ["OPEN", "X"], "default": "X"})),
    ),
    ("union-branch-added", "backward", changed(retype("note", ["null", "string", "long"]))),
    ("plain-type-widened-to-union", "backward", changed(retype("count", ["null", "int"]))),
    (
        "record-renamed-with-alias",
        "backward",
        changed(lambda d: d.update(name="Ticket", aliases=["org.example.Case"])),
    ),
    ("anything-goes-with-none", "none", changed(retype("id", "string"))),
]


@pytest.mark.parametrize(("case", "mode", "new"), AVRO_GOOD, ids=[c[0] for c in AVRO_GOOD])
def test_compatible_avro_version_is_registered(case: str, mode: str, new: dict[str, Any]) -> None:
    assert register_pair(CASE, new, mode) == 2, case


def test_recursive_avro_record_is_checked_without_looping() -> None:
    node = {
        "type": "record",
        "name": "Node",
        "fields": [
            {"name": "value", "type": "int"},
            {"name": "next", "type": ["null", "Node"], "default": None},
        ],
    }
    assert register_pair(node, changed(retype("value", "long"), node), "backward") == 2
    with pytest.raises(SchemaError, match=r"Node.value: .*rule type-changed"):
        register_pair(node, changed(retype("value", "string"), node), "backward")


# -- JSON Schema ----------------------------------------------------------------------

JSON_CASE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id"],
    "properties": {
        "id": {"type": "integer"},
        "title": {"type": "string"},
        "status": {"enum": ["open", "closed"]},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": ["string", "null"]}},
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def json_changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    return changed(edit, JSON_CASE)


def props(d: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = d["properties"]
    return properties


JSON_BAD = [
    (
        "required-without-default",
        json_changed(lambda d: d.update(required=["id", "title"])),
        "title",
        "required-without-default",
    ),
    (
        "new-required-property-without-default",
        json_changed(
            lambda d: (props(d).update(due={"type": "string"}), d.update(required=["id", "due"]))
        ),
        "due",
        "required-without-default",
    ),
    (
        "property-removed",
        json_changed(lambda d: props(d).pop("title")),
        "title",
        "property-removed",
    ),
    (
        "nested-property-removed",
        json_changed(lambda d: props(d)["owner"]["properties"].pop("email")),
        "owner.email",
        "property-removed",
    ),
    (
        "type-narrowed",
        json_changed(lambda d: props(d).__setitem__("id", {"type": "string"})),
        "id",
        "type-narrowed",
    ),
    (
        "number-to-integer",
        json_changed(lambda d: props(d).__setitem__("title", {"type": ["number"]})),
        "title",
        "type-narrowed",
    ),
    (
        "nullable-made-non-null",
        json_changed(
            lambda d: props(d)["owner"]["properties"].__setitem__("email", {"type": "string"})
        ),
        "owner.email",
        "type-narrowed",
    ),
    (
        "enum-value-removed",
        json_changed(lambda d: props(d).__setitem__("status", {"enum": ["open"]})),
        "status",
        "type-narrowed",
    ),
    (
        "array-items-narrowed",
        json_changed(lambda d: props(d)["tags"].__setitem__("items", {"type": "integer"})),
        "tags[]",
        "type-narrowed",
    ),
]


@pytest.mark.parametrize(("case", "new", "path", "rule"), JSON_BAD, ids=[c[0] for c in JSON_BAD])
@pytest.mark.parametrize("mode", ["backward", "forward", "full"])
def test_incompatible_json_schema_is_refused(
    case: str, new: dict[str, Any], path: str, rule: str, mode: str
) -> None:
    with pytest.raises(SchemaError) as refused:
        register_pair(JSON_CASE, new, mode)
    assert f"{path}: " in str(refused.value), (case, str(refused.value))
    assert f"(rule {rule})" in str(refused.value), case


JSON_GOOD = [
    ("optional-property-added", json_changed(lambda d: props(d).update(due={"type": "string"}))),
    (
        "required-with-default",
        json_changed(
            lambda d: (
                props(d)["title"].update(default=""),
                d.update(required=["id", "title"]),
            )
        ),
    ),
    ("integer-to-number", json_changed(lambda d: props(d)["id"].update(type="number"))),
    ("type-widened", json_changed(lambda d: props(d)["title"].update(type=["string", "null"]))),
    (
        "enum-value-added",
        json_changed(lambda d: props(d)["status"].update(enum=["open", "closed", "held"])),
    ),
    ("requirement-dropped", json_changed(lambda d: d.update(required=[]))),
    ("type-constraint-dropped", json_changed(lambda d: props(d)["title"].pop("type"))),
]


@pytest.mark.parametrize(("case", "new"), JSON_GOOD, ids=[c[0] for c in JSON_GOOD])
def test_compatible_json_schema_is_registered(case: str, new: dict[str, Any]) -> None:
    assert register_pair(JSON_CASE, new, "full") == 2, case


def test_json_schema_checks_are_skipped_with_none() -> None:
    assert register_pair(JSON_CASE, json_changed(lambda d: props(d).pop("title")), "none") == 2


def test_format_cannot_change_between_versions() -> None:
    with pytest.raises(SchemaError, match="version 1 is avro; a new version cannot be jsonschema"):
        register_pair(CASE, JSON_CASE, "none")


def test_invalid_documents_are_refused() -> None:
    registry = SchemaRegistry()
    with pytest.raises(SchemaError, match="not a valid Avro schema"):
        registry.register(URI, {"type": "record", "name": "X", "fields": [{"name": "a"}]})
    with pytest.raises(SchemaError, match="not a valid JSON Schema"):
        registry.register(URI, {"type": "objekt"})
    with pytest.raises(SchemaError, match="must not end in /<number>"):
        registry.register(URI + "/2", JSON_CASE)
    assert registry.uris() == []
