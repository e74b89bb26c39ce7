"""Compatibility of a new schema version with the previous one.

Avro: the schema-resolution rules of the Avro specification, checked by hand
(fastavro resolves data but has no compatibility checker). ``reader_can_read``
answers "can a reader holding schema R decode data written with schema W?":

- primitives must match, or be a promotion: int -> long, float, double;
  long -> float, double; float -> double; string <-> bytes;
- records must have the same name (or the reader lists the writer's name as an
  alias); every reader field must exist in the writer (by name or alias) or
  have a default; writer fields the reader lacks are skipped;
- enums: every writer symbol must be a reader symbol, unless the reader
  declares an enum ``default``;
- fixed: same name and size; arrays and maps: their items / values resolve;
- unions: every branch the writer may use must resolve against the reader
  (the reader itself, or one of its branches).

The modes compare the new version with the previous one: ``backward`` (new
reads old), ``forward`` (old reads new), ``full`` (both), ``none`` (no check).

JSON Schema: there is no resolution algorithm, so three rules are checked,
recursively through ``properties`` of objects and ``items`` of arrays (any
mode other than ``none``):

- ``required-without-default``: a property required by the new version that
  the old one did not require must declare a ``default``;
- ``property-removed``: a property listed in the old ``properties`` must still
  be listed;
- ``type-narrowed``: the new ``type`` must allow every type the old one
  allowed (``integer`` is covered by ``number``), and a new ``enum`` must keep
  every old value.

Nothing else (patterns, lengths, ``$ref``, combinators, ``additionalProperties``)
is compared; the docs say so (docs/schemas.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MODES = ("none", "backward", "forward", "full")

_PROMOTIONS = {
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "float"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
}
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


@dataclass(frozen=True, slots=True)
class Incompatibility:
    """One reason why a version cannot replace the previous one."""

    path: str  # where in the schema, e.g. "Case.title" or "properties.title"
    rule: str  # machine-readable rule name, e.g. "field-added-without-default"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} (rule {self.rule})"


# -- Avro --------------------------------------------------------------------------


def avro_incompatibilities(
    old: Any, new: Any, mode: str, *, named_old: Mapping[str, Any], named_new: Mapping[str, Any]
) -> list[Incompatibility]:
    """Problems with replacing ``old`` by ``new`` under ``mode`` (parsed fastavro schemas)."""
    _check_mode(mode)
    problems: list[Incompatibility] = []
    if mode in ("backward", "full"):
        found = _Resolver(named_old, named_new, "backward").check(old, new, "")
        problems.extend(found)
    if mode in ("forward", "full"):
        problems.extend(_Resolver(named_new, named_old, "forward").check(new, old, ""))
    return problems


class _Resolver:
    """Walks a writer schema and a reader schema side by side."""

    def __init__(
        self, named_writer: Mapping[str, Any], named_reader: Mapping[str, Any], mode: str
    ) -> None:
        self.named_writer = named_writer
        self.named_reader = named_reader
        self.mode = mode
        self.seen: set[tuple[str, str]] = set()  # recursive named types

    def _deref(self, schema: Any, named: Mapping[str, Any]) -> Any:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            return named.get(schema, schema)
        return schema

    def problem(self, path: str, rule: str, message: str) -> Incompatibility:
        return Incompatibility(path or "(root)", rule, f"{message} [{self.mode}]")

    def check(self, writer: Any, reader: Any, path: str) -> list[Incompatibility]:
        writer = self._deref(writer, self.named_writer)
        reader = self._deref(reader, self.named_reader)
        if isinstance(writer, list):
            problems: list[Incompatibility] = []
            for branch in writer:
                problems.extend(self._check_branch(branch, reader, path))
            return problems
        if isinstance(reader, list):
            return self._check_branch(writer, reader, path)
        return list(self._check_single(writer, reader, path))

    def _check_branch(self, writer: Any, reader: Any, path: str) -> list[Incompatibility]:
        """A non-union writer branch against a reader that may be a union."""
        writer = self._deref(writer, self.named_writer)
        if not isinstance(reader, list):
            return list(self._check_single(writer, reader, path))
        best: list[Incompatibility] | None = None
        for branch in reader:
            found = list(self._check_single(writer, self._deref(branch, self.named_reader), path))
            if not found:
                return []
            if _type_name(writer) == _type_name(self._deref(branch, self.named_reader)):
                best = found  # same kind of type: its problem is the telling one
        if best is not None:
            return best
        return [
            self.problem(
                path,
                "union-branch-missing",
                f"a {_type_name(writer)} written here matches no branch of the reader's union",
            )
        ]

    def _check_single(self, writer: Any, reader: Any, path: str) -> Iterator[Incompatibility]:
        w_type, r_type = _type_name(writer), _type_name(reader)
        if w_type != r_type:
            if (w_type, r_type) in _PROMOTIONS:
                return
            rule = "type-changed"
            yield self.problem(path, rule, f"{w_type} written cannot be read as {r_type}")
            return
        if w_type == "record":
            yield from self._check_record(writer, reader, path)
        elif w_type == "enum":
            yield from self._check_enum(writer, reader, path)
        elif w_type == "fixed":
            if not _same_name(writer, reader):
                yield self.problem(path, "name-changed", _renamed(writer, reader))
            elif writer.get("size") != reader.get("size"):
                yield self.problem(
                    path,
                    "fixed-size-changed",
                    f"fixed size {writer.get('size')} cannot be read as {reader.get('size')}",
                )
        elif w_type == "array":
            yield from self.check(writer["items"], reader["items"], f"{path}[]")
        elif w_type == "map":
            yield from self.check(writer["values"], reader["values"], f"{path}{{}}")

    def _check_record(self, writer: Any, reader: Any, path: str) -> Iterator[Incompatibility]:
        if not _same_name(writer, reader):
            yield self.problem(path, "name-changed", _renamed(writer, reader))
            return
        pair = (writer["name"], reader["name"])
        if pair in self.seen:
            return
        self.seen.add(pair)
        base = path or _short(reader["name"])
        written = {f["name"]: f for f in writer.get("fields", [])}
        for field in reader.get("fields", []):
            names = [field["name"], *field.get("aliases", [])]
            source = next((written[n] for n in names if n in written), None)
            where = f"{base}.{field['name']}"
            if source is None:
                if "default" not in field:
                    yield self.problem(
                        where,
                        "field-missing-without-default",
                        f"field {field['name']!r} is read but not written, and has no default",
                    )
                continue
            yield from self.check(source["type"], field["type"], where)

    def _check_enum(self, writer: Any, reader: Any, path: str) -> Iterator[Incompatibility]:
        if not _same_name(writer, reader):
            yield self.problem(path, "name-changed", _renamed(writer, reader))
            return
        if "default" in reader:
            return
        missing = [s for s in writer.get("symbols", []) if s not in reader.get("symbols", [])]
        if missing:
            yield self.problem(
                path or _short(reader["name"]),
                "enum-symbol-missing",
                f"symbols {missing} can be written but not read (the reader's enum has no default)",
            )


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    inner = schema.get("type")
    return inner if isinstance(inner, str) else _type_name(inner)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _same_name(writer: Mapping[str, Any], reader: Mapping[str, Any]) -> bool:
    w_name = writer.get("name", "")
    if w_name == reader.get("name"):
        return True
    aliases = reader.get("aliases", [])
    return w_name in aliases or _short(w_name) in aliases


def _renamed(writer: Mapping[str, Any], reader: Mapping[str, Any]) -> str:
    return (
        f"{writer.get('name')} cannot be read as {reader.get('name')} "
        "(add the old name to the reader's aliases)"
    )


# -- JSON Schema -------------------------------------------------------------------


def jsonschema_incompatibilities(old: Any, new: Any, mode: str) -> list[Incompatibility]:
    """The three documented checks of a new JSON Schema against the previous one."""
    _check_mode(mode)
    if mode == "none":
        return []
    return list(_compare_json(old, new, ""))


def _types(schema: Mapping[str, Any]) -> set[str] | None:
    declared = schema.get("type")
    if declared is None:
        return None  # any type
    return {declared} if isinstance(declared, str) else set(declared)


def _compare_json(old: Any, new: Any, path: str) -> Iterator[Incompatibility]:
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return
    where = path or "(root)"
    old_types, new_types = _types(old), _types(new)
    if new_types is not None:
        allowed = new_types | ({"integer"} if "number" in new_types else set())
        lost = (old_types or {"any type"}) - allowed
        if lost:
            yield Incompatibility(
                where,
                "type-narrowed",
                f"type {sorted(old_types or ['any'])} narrowed to {sorted(new_types)}",
            )
    if "enum" in new:
        dropped = [v for v in old.get("enum", []) if v not in new["enum"]]
        if dropped or "enum" not in old:
            yield Incompatibility(
                where, "type-narrowed", f"enum no longer allows {dropped or 'every value'}"
            )
    old_props: Mapping[str, Any] = old.get("properties", {})
    new_props: Mapping[str, Any] = new.get("properties", {})
    for name in old_props:
        if name not in new_props:
            yield Incompatibility(
                _join(path, name), "property-removed", f"property {name!r} was removed"
            )
    newly_required = set(new.get("required", [])) - set(old.get("required", []))
    for name in sorted(newly_required):
        if "default" not in new_props.get(name, {}):
            yield Incompatibility(
                _join(path, name),
                "required-without-default",
                f"property {name!r} became required without a default",
            )
    for name, old_child in old_props.items():
        if name in new_props:
            yield from _compare_json(old_child, new_props[name], _join(path, name))
    if "items" in old and "items" in new:
        yield from _compare_json(old["items"], new["items"], f"{path}[]")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"compatibility must be one of {', '.join(MODES)}, got {mode!r}")
