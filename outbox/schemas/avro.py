"""Avro schemas and the Avro single-object encoding, with fastavro.

A single-object encoded body is ``C3 01``, the 8-byte CRC-64-AVRO fingerprint
of the writer schema's Parsing Canonical Form (little-endian, as the Java
implementation writes it), then the datum in Avro binary encoding. The
fingerprint is enough for a consumer to find the writer schema in the registry
(or in its local ``.avsc`` files) and decode the body with its own reader schema.

fastavro is an optional dependency (``pip install outbox[avro]``); this module
is imported only where Avro is used.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import ValidationError as AvroValidationError
from fastavro.validation import validate as avro_validate

from outbox.errors import ContentValidationError, EnvelopeError, SchemaError

if TYPE_CHECKING:
    from outbox.schemas.registry import SchemaRegistry
    from outbox.store.rows import EventRow

MAGIC = b"\xc3\x01"
CONTENT_TYPE = "application/avro"  # the single-object encoding, per the Avro spec's media type
HEADER_LENGTH = len(MAGIC) + 8

ParsedSchema = Any


def parse(document: Any) -> tuple[ParsedSchema, dict[str, Any]]:
    """Parse an Avro schema; return it with the named types it defines."""
    named: dict[str, Any] = {}
    try:
        parsed = fastavro.parse_schema(document, named_schemas=named)
    except Exception as exc:  # fastavro raises several unrelated types
        raise SchemaError(f"not a valid Avro schema: {exc}") from None
    return parsed, named


def canonical_form(document: Any) -> str:
    """The Parsing Canonical Form of the Avro spec (names, types, order; no docs or defaults)."""
    return str(to_parsing_canonical_form(document))


def sha256_fingerprint(document: Any) -> str:
    return hashlib.sha256(canonical_form(document).encode("utf-8")).hexdigest()


def crc64_fingerprint(document: Any) -> bytes:
    """The 8 bytes the single-object encoding carries after the magic."""
    return bytes.fromhex(fingerprint(canonical_form(document), "CRC-64-AVRO"))


def validator(parsed: ParsedSchema) -> Callable[[Any], None]:
    """A function raising :class:`ContentValidationError` naming the offending field."""
    root = parsed.get("name", "") if isinstance(parsed, dict) else ""

    def check(content: Any) -> None:
        try:
            avro_validate(content, parsed, raise_errors=True)
        except AvroValidationError as exc:
            raise ContentValidationError(describe(exc, root)) from None

    return check


def describe(exc: AvroValidationError, root: str = "") -> str:
    """One clause per error: the field path (without the record's full name) and the cause."""
    parts = []
    for error in exc.errors or []:
        field = str(getattr(error, "field", "") or "")
        # fastavro prefixes the path with the top-level record's full name.
        path = field.removeprefix(root).lstrip(".") if root else field
        schema = getattr(error, "schema", None)
        datum = getattr(error, "datum", None)
        expected = json.dumps(schema) if not isinstance(schema, str) else schema
        parts.append(f"{path or '(root)'}: {datum!r} is not a valid {expected}")
    return "; ".join(parts) or str(exc)


def encode(content: Any, parsed: ParsedSchema, fingerprint64: bytes) -> bytes:
    """Single-object encoding of ``content`` (validate it first)."""
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(fingerprint64)
    try:
        fastavro.schemaless_writer(out, parsed, content)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise ContentValidationError(f"content cannot be Avro-encoded: {exc}") from None
    return out.getvalue()


def is_single_object(body: bytes) -> bool:
    return len(body) >= HEADER_LENGTH and body[:2] == MAGIC


def split(body: bytes) -> tuple[bytes, bytes]:
    """(fingerprint, payload) of a single-object encoded body."""
    if not is_single_object(body):
        raise EnvelopeError("not an Avro single-object encoded body (no C3 01 magic)")
    return body[2:HEADER_LENGTH], body[HEADER_LENGTH:]


def decode(payload: bytes, writer: ParsedSchema, reader: ParsedSchema | None = None) -> Any:
    """Decode the datum written with ``writer``, resolved into ``reader`` when given."""
    try:
        return fastavro.schemaless_reader(io.BytesIO(payload), writer, reader)
    except Exception as exc:  # fastavro raises EOFError, SchemaResolutionError, ...
        raise EnvelopeError(f"cannot decode the Avro body: {exc}") from None


def body_encoder(registry: SchemaRegistry) -> Callable[[EventRow, dict[str, Any]], Any]:
    """The relay's ``body_encoder`` for ``body_format=avro``.

    Content whose schema is a registered Avro schema is sent as a single-object
    encoded body (``application/avro``); anything else keeps its JSON body.
    """
    fingerprints: dict[tuple[str, int], bytes] = {}

    def encode_row(row: EventRow, data: dict[str, Any]) -> tuple[bytes, str] | None:
        resource = data["resource"]
        schema = registry.resolve(resource["schema"], row.schema_version)
        if schema is None or schema.format != "avro":
            return None
        key = (schema.uri, schema.version)
        crc = fingerprints.get(key)
        if crc is None:
            crc = fingerprints[key] = crc64_fingerprint(schema.document)
        return encode(resource["content"], registry.parsed_avro(schema), crc), CONTENT_TYPE

    return encode_row
