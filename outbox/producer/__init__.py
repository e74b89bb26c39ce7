"""The producer side: ``publish`` and the SQLAlchemy session hooks that call it."""

from outbox.producer.hooks import child_of, instrument, resource
from outbox.producer.publish import ProducerOptions, configure, flush_events, publish

__all__ = [
    "ProducerOptions",
    "child_of",
    "configure",
    "flush_events",
    "instrument",
    "publish",
    "resource",
]
