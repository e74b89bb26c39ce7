"""outbox: transactional outbox relay for database-backed producers.

Producers call :func:`publish` inside their own transaction; the relay
(``outbox relay``) forwards committed events to the broker in order.
"""

from __future__ import annotations

from outbox.envelope import Action, Envelope, ResourceReference
from outbox.errors import (
    ConfigurationError,
    ContentEncodingError,
    EnvelopeError,
    OutboxError,
)
from outbox.producer import ProducerOptions, configure, flush_events, publish

__all__ = [
    "Action",
    "ConfigurationError",
    "ContentEncodingError",
    "Envelope",
    "EnvelopeError",
    "OutboxError",
    "ProducerOptions",
    "ResourceReference",
    "configure",
    "flush_events",
    "publish",
]
