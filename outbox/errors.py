"""Every error the package raises on purpose derives from :class:`OutboxError`.

Driver and broker exceptions are translated into these at the seams (store,
publisher), so that callers and the CLI handle one hierarchy.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of all errors raised by outbox."""


class ConfigurationError(OutboxError):
    """A setting is missing or malformed (bad URL, bad number...)."""


class EnvelopeError(OutboxError, ValueError):
    """An envelope is invalid: it does not match the event schema or its content is not JSON."""


class ContentEncodingError(EnvelopeError, TypeError):
    """Content holds a value that has no lossless JSON encoding."""


class UnsendableEventError(EnvelopeError):
    """The event could never be sent to the broker: a length, range or size limit.

    Raised by ``publish`` before anything is written; the relay marks a row it
    cannot send (one written by other means) dead with the same message.
    """


class SchemaError(OutboxError):
    """A resource schema is unknown, malformed, or incompatible with its previous version."""


class ContentValidationError(EnvelopeError):
    """Content does not conform to the resource schema it names."""


class StoreError(OutboxError):
    """The database could not be reached or a query failed."""


class StoreUnavailable(StoreError):
    """The database is down or the connection was lost; retrying later may succeed."""


class SchemaNotMigrated(StoreError):
    """The outbox tables do not exist: run `outbox migrate`."""


class PublishError(OutboxError):
    """The broker did not confirm a message."""


class BrokerUnavailable(PublishError):
    """The broker is down or the connection was lost; retrying later may succeed."""


class LeaseLost(OutboxError):
    """This relay no longer owns a partition it was publishing."""


class ResourceContentError(EnvelopeError):
    """A published resource's event could not be built (content does not serialise or validate)."""


class BulkChangeError(OutboxError):
    """A bulk ORM statement would change published resources without publishing their events."""
