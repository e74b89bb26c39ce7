"""outbox: transactional outbox relay for database-backed producers.

Producers call :func:`publish` inside their own transaction; the relay
(``outbox relay``) forwards committed events to the broker in order.
"""

from __future__ import annotations

from outbox.envelope import Action, Envelope, ResourceReference
from outbox.errors import (
    BulkChangeError,
    ConfigurationError,
    ContentEncodingError,
    EnvelopeError,
    OutboxError,
    ResourceContentError,
)
from outbox.producer import (
    ProducerOptions,
    child_of,
    configure,
    flush_events,
    instrument,
    publish,
    resource,
)

__all__ = [
    "Action",
    "BulkChangeError",
    "ConfigurationError",
    "ContentEncodingError",
    "Envelope",
    "EnvelopeError",
    "OutboxError",
    "ProducerOptions",
    "ResourceContentError",
    "ResourceReference",
    "child_of",
    "configure",
    "flush_events",
    "instrument",
    "publish",
    "resource",
]
