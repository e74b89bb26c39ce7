"""The message the relay sends for one outbox row: body, properties and headers.

Headers carry what a consumer needs without parsing the body: the action, the
schema URI (and registry version), the ordering key, and the CloudEvents
attributes in binary content mode (``ce-`` headers, as the CloudEvents SDK's
RabbitMQ binding reads them).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outbox.envelope.jsontext import parse_json
from outbox.envelope.limits import check_exchange_name, check_header_integers
from outbox.errors import UnsendableEventError
from outbox.store.rows import EventRow

CONTENT_TYPE_JSON = "application/json"
CLOUDEVENTS_SPEC_VERSION = "1.0"
# The $id of event.schema.json: what a JSON body (the whole envelope) conforms to.
ENVELOPE_SCHEMA_URI = "https://callisto.digital.homeoffice.gov.uk/event.schema.json"
# The headers whose values repeat across messages (a handful of distinct values
# in millions of messages), first in every message and in this order: the
# frame encoder encodes them once per distinct set (outbox.relay.frames).
LEADING_HEADERS = (
    "outbox-action",
    "outbox-schema",
    "outbox-resource-type",
    "ce-specversion",
    "ce-source",
    "ce-type",
    "ce-dataschema",
)


# Not frozen: the relay builds one per event on its database thread, and a
# frozen dataclass's __init__ costs 0.7 µs more per message (three times a plain
# one's). Nothing changes a message once built; the window and the lanes pass
# the same object along and compare it by identity.
@dataclass(kw_only=True, slots=True)
class OutgoingMessage:
    position: int
    message_id: str
    routing_key: str
    body: bytes
    content_type: str
    timestamp: dt.datetime
    headers: dict[str, Any]
    # Failed publishes recorded in the row when it was fetched.
    attempts: int = 0
    # The exchange the row names; None: the publisher's own.
    exchange: str | None = None
    # The row's ordering key (also the outbox-key header) and partition.
    ordering_key: str = ""
    partition: int = 0


# The events of one transaction share their created_at: convert each moment once.
@functools.lru_cache(maxsize=1024)
def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


@functools.lru_cache(maxsize=1024)
def _ce_time(moment: dt.datetime) -> str:
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def stored_headers(stored: str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The producer's extra headers of a row (stored as JSON text).

    ValueError if they are not a JSON object, or hold what a header frame
    cannot carry as written (see :func:`_check_value`); UnsendableEventError if
    a value holds an integer that AMQP cannot carry.
    """
    # Exact integers: one beyond 64 bits must be refused, not sent as another value.
    headers = parse_json(stored) if isinstance(stored, str) else stored
    if headers is None:  # JSON null, as rows written before SQL NULL was used hold
        return {}
    if not isinstance(headers, Mapping):
        raise ValueError(f"the row's headers must be a JSON object, not {type(headers).__name__}")
    for name, value in headers.items():
        _check_text(name, name)
        _check_value(name, value)
    return headers


def _check_value(name: str, value: Any) -> None:
    """Refuse, anywhere in header ``name``'s value, what JSON text may say but a
    header frame cannot carry: a number beyond a double (``1e400`` reads as
    infinity), a lone surrogate escape (no UTF-8 encoding), an integer beyond 64 bits.
    """
    if isinstance(value, str):
        _check_text(name, value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"header {name!r}: {value} is not a finite number")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_text(name, key)
            _check_value(name, item)
    elif isinstance(value, list):
        for item in value:
            _check_value(name, item)
    else:
        check_header_integers(name, value)


def _check_text(name: str, text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"header {name!r}: {text[:40]!r} holds a lone surrogate escape, not Unicode text"
        ) from None


@functools.lru_cache(maxsize=4096)
def type_namespace(schema: str) -> str:
    """The reverse-DNS name of the schema URI's host, with a trailing dot; "" without one.

    ``https://example.org/schemas/case`` gives ``org.example.``: the
    organisation that owns the schema names the event type, as the
    CloudEvents spec asks of ``type`` ("SHOULD be prefixed with a reverse-DNS
    name"). A URN or an IP address has no such name.
    """
    try:
        host = urlsplit(schema).hostname or ""
    except ValueError:
        return ""
    if not host or host.replace(".", "").isdigit() or ":" in host:
        return ""
    return ".".join(reversed(host.rstrip(".").split("."))) + "."


def build_message(
    row: EventRow,
    action: str,
    schema: str,
    *,
    source: str,
    type_prefix: str | None = None,
    body: bytes | None = None,
    content_type: str = CONTENT_TYPE_JSON,
) -> OutgoingMessage:
    """Build the message for ``row``; ``body`` defaults to the stored envelope, unchanged.

    ``type_prefix`` starts ``ce-type``; None: the :func:`type_namespace` of the schema URI.
    """
    created = _utc(row.created_at)
    if created < _EPOCH:
        raise UnsendableEventError(
            f"created_at {created.isoformat()} is before 1970: "
            "an AMQP timestamp counts seconds since 1970 and cannot be negative"
        )
    if row.exchange is not None:
        check_exchange_name(row.exchange)  # rows written by other means than publish
    message_id = str(row.event_id)
    prefix = type_namespace(schema) if type_prefix is None else type_prefix
    headers: dict[str, Any] = {  # LEADING_HEADERS first, in their order
        "outbox-action": action,
        "outbox-schema": schema,
        "outbox-resource-type": row.resource_type,
        "ce-specversion": CLOUDEVENTS_SPEC_VERSION,
        "ce-source": source,
        "ce-type": f"{prefix}{row.resource_type}.{action}",
        # The schema of the body: the envelope's for a JSON body (the content's
        # schema is outbox-schema), the content's for an Avro body (content only).
        "ce-dataschema": ENVELOPE_SCHEMA_URI if content_type == CONTENT_TYPE_JSON else schema,
        "outbox-key": row.ordering_key,
        "ce-id": message_id,
        "ce-time": _ce_time(created),
        "ce-subject": row.ordering_key,
    }
    if row.schema_version is not None:
        headers["outbox-schema-version"] = row.schema_version
    if row.headers:
        for name, value in stored_headers(row.headers).items():
            headers.setdefault(name, value)
    return OutgoingMessage(
        position=row.position,
        message_id=message_id,
        routing_key=row.routing_key,
        body=row.payload.encode("utf-8") if body is None else body,
        content_type=content_type,
        timestamp=created,
        headers=headers,
        attempts=row.attempts,
        exchange=row.exchange,
        ordering_key=row.ordering_key,
        partition=row.partition,
    )
