"""The consumer toolkit: decode received messages, validate them, process each once.

``decode`` turns a message body (JSON envelope, or an Avro single-object body)
and its headers into a :class:`ReceivedEvent`; ``decode_message`` does the same
for a kombu message. Content is validated against a
:class:`~outbox.schemas.registry.SchemaRegistry` (the producer's database, or local
schema files with :meth:`SchemaRegistry.from_files`).

:class:`IdempotentConsumer` processes a redelivered message once: it records
the message id in ``outbox_inbox`` in the same transaction as the handler's
own writes, and acknowledges the message only after that transaction
committed. A message redelivered after a crash between commit and ack finds
its id already recorded and is acknowledged without running the handler again.
The consumer creates no table: ``outbox migrate``, run against the consumer's
database, creates ``outbox_inbox``; without it, processing raises
:class:`~outbox.errors.SchemaNotMigrated` saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from outbox.envelope import validation
from outbox.envelope.jsontext import parse_json
from outbox.envelope.model import Action, Envelope, ResourceReference
from outbox.errors import EnvelopeError, OutboxError, SchemaNotMigrated
from outbox.logs import emit
from outbox.schemas.registry import SchemaRegistry, avro_module
from outbox.store import table
from outbox.store.driver_errors import store_error

log = logging.getLogger(__name__)

AVRO_CONTENT_TYPES = ("application/avro", "avro/binary", "application/vnd.apache.avro+binary")


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceivedEvent:
    """A decoded message: the envelope plus what the headers say about it."""

    envelope: Envelope
    message_id: str | None = None
    schema_version: int | None = None  # the producer registry's version, from the headers
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"

    @property
    def action(self) -> Action:
        return self.envelope.action

    @property
    def schema(self) -> str:
        return self.envelope.schema

    @property
    def content(self) -> Mapping[str, Any]:
        """The content as sent (for a reference, its three fields)."""
        content = self.envelope.content
        return content.to_dict() if isinstance(content, ResourceReference) else content

    @property
    def reference(self) -> ResourceReference | None:
        """The content as a :class:`ResourceReference` when it is one (deletes, thin events)."""
        return self.envelope.reference

    @property
    def key(self) -> str | None:
        key = self.headers.get("outbox-key")
        return None if key is None else str(key)


def decode(
    body: bytes | str,
    headers: Mapping[str, Any] | None = None,
    *,
    content_type: str | None = None,
    message_id: str | None = None,
    schemas: SchemaRegistry | None = None,
    validate: bool = True,
    strict: bool = False,
    avro_readers: Mapping[str, Any] | None = None,
) -> ReceivedEvent:
    """Decode one message into a :class:`ReceivedEvent`.

    With ``schemas``, JSON content is validated against the version the
    ``outbox-schema-version`` header names (database registry) or the latest
    local version (in-memory registry: local files have their own numbering);
    ``strict`` refuses a URI the registry does not know. An Avro body is
    decoded with the writer schema its fingerprint names, resolved into the
    consumer's own schema for its URI when ``avro_readers`` has one.
    Raises :class:`~outbox.errors.EnvelopeError` (or ``ContentValidationError``).
    """
    headers = dict(headers or {})
    version = _int_or_none(headers.get("outbox-schema-version"))
    if (content_type or "").split(";")[0].strip() in AVRO_CONTENT_TYPES:
        envelope = _decode_avro(body, headers, schemas, avro_readers)
        return ReceivedEvent(
            envelope=envelope,
            message_id=message_id,
            schema_version=version,
            headers=headers,
            content_type=str(content_type),
        )
    try:
        data = parse_json(body)
    except ValueError as exc:
        raise EnvelopeError(f"message body is not JSON: {exc}") from None
    validation.check_envelope(data)
    envelope = Envelope.from_dict(data)
    if schemas is not None and validate:
        pinned = version if schemas.engine is not None else None
        schemas.check_content(
            envelope.schema, data["resource"]["content"], version=pinned, strict=strict
        )
    return ReceivedEvent(
        envelope=envelope,
        message_id=message_id,
        schema_version=version,
        headers=headers,
        content_type=content_type or "application/json",
    )


def _decode_avro(
    body: bytes | str,
    headers: Mapping[str, Any],
    schemas: SchemaRegistry | None,
    avro_readers: Mapping[str, Any] | None,
) -> Envelope:
    avro = avro_module()

    if schemas is None:
        raise EnvelopeError("an Avro body needs a schema registry to find its writer schema")
    raw = body.encode("latin-1") if isinstance(body, str) else body
    crc, payload = avro.split(raw)
    writer = schemas.by_fingerprint(crc)
    if writer is None:
        raise EnvelopeError(f"no registered Avro schema has the fingerprint {crc.hex()}")
    uri = str(headers.get("outbox-schema") or writer.uri)
    reader = None
    if avro_readers and uri in avro_readers:
        reader, _ = avro.parse(avro_readers[uri])
    content = avro.decode(payload, schemas.parsed_avro(writer), reader)
    action = headers.get("outbox-action")
    if action is None:
        raise EnvelopeError("an Avro body needs the outbox-action header")
    return Envelope(action=action, schema=uri, content=content)


def decode_message(message: Any, **options: Any) -> ReceivedEvent:
    """Decode a received kombu message (see :func:`decode` for ``options``)."""
    properties = getattr(message, "properties", {}) or {}
    return decode(
        message.body,
        message.headers,
        content_type=message.content_type,
        message_id=properties.get("message_id"),
        **options,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


# -- processing each message once ------------------------------------------------------


_INBOX_MISSING = (
    f"the inbox table {table.inbox.name} does not exist in this database: run `outbox "
    "migrate` against it (--database-url or OUTBOX_DATABASE_URL naming the consumer's "
    "database), or add the outbox migrations to its Alembic history (docs/quickstart.md)"
)


def create_inbox_table(engine: Engine) -> None:
    """Bring ``engine``'s database to the outbox migrations' head, as ``outbox migrate`` does.

    The inbox is created by those migrations, with the other outbox tables
    (empty in a consumer's database); a release that made the table here is
    taken over as it is. Prefer running ``outbox migrate`` where the service
    runs its own migrations: it is the same.
    """
    from outbox.store import migrate  # Alembic, only when asked for

    migrate.upgrade(engine)


def claim(connection: Connection, consumer: str, message_id: str) -> bool:
    """Record ``message_id`` as processed by ``consumer``; False when it already was.

    Call it inside the transaction that does the work: if that rolls back, so
    does the claim. A concurrent duplicate waits on the first one's row lock
    and then finds the id taken.
    """
    values = {"consumer": consumer, "message_id": message_id}
    dialect = connection.dialect.name
    if dialect == "postgresql":
        statement: Any = postgresql.insert(table.inbox).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(table.inbox).values(values).on_conflict_do_nothing()
    else:
        raise OutboxError(f"the inbox supports PostgreSQL and SQLite, not {dialect}")
    try:
        # RETURNING, not rowcount: some drivers report -1 for INSERT ... ON CONFLICT.
        inserted = connection.execute(statement.returning(table.inbox.c.message_id)).first()
    except DBAPIError as exc:
        if isinstance(store_error(exc), SchemaNotMigrated):
            raise SchemaNotMigrated(_INBOX_MISSING) from exc
        raise
    return inserted is not None


Handler = Callable[[Any, ReceivedEvent], None]


class IdempotentConsumer:
    """Runs ``handler(session_or_connection, event)`` at most once per message id.

    ``database`` is an Engine (the handler gets a Connection) or a
    ``sessionmaker`` (the handler gets a Session); either way the inbox row and
    the handler's writes commit together. ``handle_message`` is a kombu
    ``on_message`` handler (``kombu.Consumer(queue, on_message=c.handle_message)``;
    ``on_message`` is the ``callbacks=[...]`` form): it acks after commit,
    rejects an undecodable message without requeue (so a dead-letter exchange
    gets it), and requeues one whose handler failed. Without the inbox table
    (``outbox migrate`` creates it), it requeues the message and raises
    :class:`~outbox.errors.SchemaNotMigrated`: no message can be processed.
    """

    def __init__(
        self,
        database: Engine | sessionmaker[Session],
        name: str,
        handler: Handler,
        *,
        schemas: SchemaRegistry | None = None,
        strict: bool = False,
        avro_readers: Mapping[str, Any] | None = None,
    ) -> None:
        self.database = database
        self.name = name
        self.handler = handler
        self.decode_options: dict[str, Any] = {
            "schemas": schemas,
            "strict": strict,
            "avro_readers": avro_readers,
        }

    def process(self, event: ReceivedEvent) -> bool:
        """Handle ``event`` in one transaction with its inbox row; False for a duplicate."""
        if not event.message_id:
            raise EnvelopeError("the message has no message_id; it cannot be de-duplicated")
        if isinstance(self.database, Engine):
            with self.database.begin() as connection:
                if not claim(connection, self.name, event.message_id):
                    return False
                self.handler(connection, event)
            return True
        with self.database() as session, session.begin():
            if not claim(session.connection(), self.name, event.message_id):
                return False
            self.handler(session, event)
        return True

    def on_message(self, body: Any, message: Any) -> None:
        """kombu ``callbacks=[...]`` entry (kombu's decoded ``body`` is not used)."""
        del body
        self.handle_message(message)

    def handle_message(self, message: Any) -> None:
        """kombu ``on_message=`` entry: decode, process once, then acknowledge.

        ``on_message`` skips kombu's own body decoding, which knows nothing of
        ``application/avro``.
        """
        try:
            event = decode_message(message, **self.decode_options)
        except EnvelopeError as exc:
            emit(
                log,
                "consumer_message_rejected",
                "message rejected: %s",
                exc,
                level=logging.ERROR,
                consumer=self.name,
            )
            message.reject(requeue=False)
            return
        try:
            handled = self.process(event)
        except SchemaNotMigrated:
            message.requeue()
            raise  # no message can be processed before the inbox exists
        except Exception:
            log.exception("consumer %s failed on message %s; requeued", self.name, event.message_id)
            message.requeue()
            return
        if not handled:
            emit(
                log,
                "consumer_duplicate_skipped",
                "message %s was already processed by %s",
                event.message_id,
                self.name,
                consumer=self.name,
                message_id=event.message_id,
            )
        message.ack()
