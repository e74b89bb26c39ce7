"""The message the relay sends for one outbox row: body, properties and headers.

Headers carry what a consumer needs without parsing the body: the action, the
schema URI (and registry version), the ordering key, and the CloudEvents
attributes in binary content mode (``ce-`` headers, as the CloudEvents SDK's
RabbitMQ binding reads them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from outbox.store import EventRow

CONTENT_TYPE_JSON = "application/json"
CLOUDEVENTS_SPEC_VERSION = "1.0"
# Headers with few distinct values across all messages (the frame encoder memoises them).
REPEATING_HEADERS = frozenset(
    (
        "outbox-action",
        "outbox-schema",
        "outbox-resource-type",
        "ce-specversion",
        "ce-source",
        "ce-type",
        "ce-dataschema",
    )
)


@dataclass(frozen=True, kw_only=True, slots=True)
class OutgoingMessage:
    position: int
    message_id: str
    routing_key: str
    body: bytes
    content_type: str
    timestamp: dt.datetime
    headers: dict[str, Any]


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _ce_time(moment: dt.datetime) -> str:
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def build_message(
    row: EventRow,
    action: str,
    schema: str,
    *,
    source: str,
    type_prefix: str = "",
    body: bytes | None = None,
    content_type: str = CONTENT_TYPE_JSON,
) -> OutgoingMessage:
    """Build the message for ``row``; ``body`` defaults to the stored envelope, unchanged."""
    created = _utc(row.created_at)
    message_id = str(row.event_id)
    headers: dict[str, Any] = {
        "outbox-action": action,
        "outbox-schema": schema,
        "outbox-key": row.ordering_key,
        "outbox-resource-type": row.resource_type,
        "ce-specversion": CLOUDEVENTS_SPEC_VERSION,
        "ce-id": message_id,
        "ce-source": source,
        "ce-type": f"{type_prefix}{row.resource_type}.{action}",
        "ce-time": _ce_time(created),
        "ce-dataschema": schema,
        "ce-subject": row.ordering_key,
    }
    if row.schema_version is not None:
        headers["outbox-schema-version"] = row.schema_version
    if row.headers:
        for name, value in row.headers.items():
            headers.setdefault(name, value)
    return OutgoingMessage(
        position=row.position,
        message_id=message_id,
        routing_key=row.routing_key,
        body=row.payload.encode("utf-8") if body is None else body,
        content_type=content_type,
        timestamp=created,
        headers=headers,
    )
