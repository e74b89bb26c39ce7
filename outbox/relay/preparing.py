"""Rows into messages: parse, check, validate, encode, build; a bad row is the row's fault.

Runs on the relay's database thread. What goes wrong with one row (its JSON,
the envelope, its content, its headers, a length or range AMQP cannot carry)
raises for that row alone; errors of the database, the broker or the process
(:data:`NOT_THE_ROWS_FAULT`) are not the row's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outbox.envelope import fastcheck, limits
from outbox.envelope.jsontext import parse_json
from outbox.errors import EnvelopeError, PublishError, StoreError
from outbox.relay.message import CONTENT_TYPE_JSON, OutgoingMessage, build_message
from outbox.relay.settings import RelaySettings
from outbox.store.rows import EventRow

Validator = Callable[[EventRow, dict[str, object]], None]
# Returns (body, content type) to send instead of the stored JSON, or None to keep it.
BodyEncoder = Callable[[EventRow, dict[str, object]], tuple[bytes, str] | None]

# Errors that say nothing about the row being turned into a message: the
# database, the broker or the process itself failed. Everything else raised
# while building one message is that row's fault.
NOT_THE_ROWS_FAULT: tuple[type[BaseException], ...] = (StoreError, PublishError, MemoryError)


def parse_payload(payload: str) -> Any:
    """The stored envelope as Python values; ValueError if it is not JSON.

    The rules of :func:`outbox.envelope.jsontext.parse_json`: standard JSON
    without NaN or Infinity. The body sent is the stored text, never these
    values; they serve the checks, so they are read the fast way: an integer
    beyond 64 bits becomes a float, and content validation compares such a
    number at double precision.
    """
    return parse_json(payload, exact_integers=False)


def message_for(
    row: EventRow,
    settings: RelaySettings,
    content_validator: Validator | None = None,
    body_encoder: BodyEncoder | None = None,
) -> OutgoingMessage:
    """The message for ``row``; raises if the row cannot become one."""
    try:
        data = parse_payload(row.payload)
    except (ValueError, RecursionError) as exc:  # Recursion: nested too deeply
        raise EnvelopeError(f"invalid JSON: {exc}") from None
    fastcheck.check_envelope(data)
    if content_validator is not None:
        content_validator(row, data)
    encoded = body_encoder(row, data) if body_encoder else None
    body, content_type = encoded or (None, CONTENT_TYPE_JSON)
    message = build_message(
        row,
        data["action"],
        data["resource"]["schema"],
        source=settings.source,
        type_prefix=settings.type_prefix,
        body=body,
        content_type=content_type,
    )
    limits.check_payload_size(len(message.body), settings.max_payload_bytes)
    return message


def reason_of(exc: BaseException) -> str:
    """The reason stored with a dead row."""
    if isinstance(exc, EnvelopeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
