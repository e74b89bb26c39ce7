"""Writing events into the producer's own transaction.

``publish`` never talks to the broker: it adds an outbox row to the caller's
transaction, so the event exists exactly when the change it describes commits.

With a :class:`~sqlalchemy.orm.Session` the rows are buffered and written in
one multi-row INSERT just before the transaction (or SAVEPOINT) commits; with a
:class:`~sqlalchemy.engine.Connection` they are written at once. Before the
INSERT the producer takes one transaction-scoped advisory lock per ordering key
(PostgreSQL), in ascending lock-id order so that two writers can never
deadlock on each other's keys. Holding the key's lock from before the row's
position is assigned until commit makes position order equal commit order for
that key, which is what the relay relies on.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, func, select, text
from sqlalchemy.orm import Session

from outbox.envelope import codec, fastcheck, limits, ordering
from outbox.envelope.model import Envelope
from outbox.errors import SchemaNotMigrated, UnsendableEventError
from outbox.producer import tracing
from outbox.producer.savepoints import SavepointLog, log_for, track
from outbox.store import table

if TYPE_CHECKING:
    from outbox.schemas.registry import ConnectionSource, SchemaRegistry

OPTIONS_KEY = "outbox.producer_options"
_BUFFER_KEY = "outbox.buffer"
_LISTENING_KEY = "outbox.buffer.listening"


@dataclass(frozen=True, kw_only=True, slots=True)
class ProducerOptions:
    """Per-service producer settings, attached to a session factory or connection.

    ``notify``: send ``pg_notify`` from the producer's transaction so that an
    idle relay wakes up at commit. It serialises commits briefly inside
    PostgreSQL; turn it off for very write-heavy services and let the relay poll.

    ``schemas``: the :class:`~outbox.schemas.registry.SchemaRegistry` to validate
    content against; by default, the registry in the outbox's own database
    (``outbox_schema``, read through the session's connection). Content whose
    ``resource.schema`` is registered is validated at ``publish`` and the row
    records the version it was validated against. ``strict``: refuse a URI the
    registry does not know (default: accept it, logged once per URI).
    ``validate``: turn content validation off for this service.
    ``max_payload_bytes``: refuse a larger event at ``publish`` (UTF-8 bytes of
    the stored envelope); keep it at or below the relay's ``--max-payload-bytes``.
    """

    notify: bool = True
    schemas: SchemaRegistry | None = None
    strict: bool = False
    validate: bool = True
    max_payload_bytes: int = limits.DEFAULT_MAX_PAYLOAD_BYTES


DEFAULT_OPTIONS = ProducerOptions()


def configure(target: Session | Connection | Any, options: ProducerOptions) -> None:
    """Attach producer options to a session, a connection or a ``sessionmaker``."""
    if isinstance(target, Session | Connection):
        target.info[OPTIONS_KEY] = options
        return
    kw = getattr(target, "kw", None)  # sessionmaker / async_sessionmaker
    if kw is None:
        raise TypeError(f"cannot configure {type(target).__name__}; pass a session or sessionmaker")
    info = dict(kw.get("info") or {})
    info[OPTIONS_KEY] = options
    kw["info"] = info


def prepare_row(
    envelope: Envelope,
    *,
    key: str | None = None,
    resource_type: str | None = None,
    routing_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    options: ProducerOptions = DEFAULT_OPTIONS,
    schemas: Schemas | None = None,
    exchange: str | None = None,
) -> dict[str, Any]:
    """Validate an envelope and turn it into an outbox row (no I/O but a registry reload).

    Raises :class:`~outbox.errors.EnvelopeError` (or its subclasses
    ``ContentEncodingError``, ``ContentValidationError``, ``UnsendableEventError``
    for what no broker would take) before anything is written.
    """
    data = envelope.to_dict()
    fastcheck.check_envelope(data)  # jsonschema's rules, without its cost per event
    schema_version = None
    if schemas is None and options.schemas is not None and options.validate:
        schemas = Schemas(options.schemas)
    if schemas is not None:
        checked = schemas.registry.check_content(
            envelope.schema, data["resource"]["content"], strict=options.strict, using=schemas.using
        )
        schema_version = checked.version if checked is not None else None
    resource_type = resource_type or ordering.default_resource_type(envelope.schema)
    if key is None:
        content = data["resource"]["content"]
        key = ordering.default_key(resource_type, content)
    extra = dict(headers) if headers else {}
    for name, value in tracing.current_trace_headers().items():
        extra.setdefault(name, value)  # an explicit traceparent wins
    reference = envelope.reference
    if reference is not None:
        extra.setdefault("outbox-resource-version", str(reference.version))
    routing_key = routing_key or f"{resource_type}.{envelope.action.value}"
    payload = codec.dumps(data)
    _check_sendable(key, routing_key, resource_type, envelope.schema, extra, payload, options)
    if exchange is not None:
        limits.check_exchange_name(exchange)
    row = {
        "event_id": uuid.uuid4(),
        "ordering_key": key,
        "routing_key": routing_key,
        "resource_type": resource_type,
        "payload": payload,
        "headers": extra or None,
        "schema_version": schema_version,
    }
    if exchange is not None:
        # Only then: a schema before revision outbox_0003 has no such column.
        row["exchange"] = exchange
    return row


def _check_sendable(
    key: str,
    routing_key: str,
    resource_type: str,
    schema: str,
    headers: Mapping[str, Any],
    payload: str,
    options: ProducerOptions,
) -> None:
    """Refuse now what the relay could never send (see :mod:`outbox.envelope.limits`)."""
    if not isinstance(key, str) or not key:
        raise UnsendableEventError("the ordering key must be a non-empty string")
    limits.check_short_string("the routing key", routing_key)
    if not isinstance(resource_type, str) or not resource_type:
        raise UnsendableEventError("the resource type must be a non-empty string")
    # The relay sends the key, the schema URI and the type twice each (outbox- and ce- headers).
    repeated = 2 * sum(map(limits.utf8_length, (key, schema, resource_type)))
    limits.check_headers(headers, repeated=repeated)
    # A character takes at most 4 bytes: count exactly only near the limit.
    if len(payload) * 4 > options.max_payload_bytes:
        limits.check_payload_size(limits.utf8_length(payload), options.max_payload_bytes)


def publish(
    session: Session | Connection,
    envelope: Envelope,
    *,
    key: str | None = None,
    resource_type: str | None = None,
    routing_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    exchange: str | None = None,
) -> uuid.UUID:
    """Add ``envelope`` to the transaction of ``session`` and return its event id.

    ``key`` orders events: those sharing a key are delivered in commit order
    (default ``<resource type>:<tenantId>:<id>``). ``resource_type`` defaults to
    the last segment of the schema URI; the routing key to ``<type>.<action>``.
    ``exchange`` is stored in the row and the relay publishes to it (declaring
    it first when it declares its own); None: the relay's ``--exchange``.
    """
    options = options_of(session.info)
    row = prepare_row(
        envelope,
        key=key,
        resource_type=resource_type,
        routing_key=routing_key,
        headers=headers,
        options=options,
        schemas=schemas_for(session, options),
        exchange=exchange,
    )
    if isinstance(session, Connection):
        write_rows(session, [row], options)
    else:
        _buffer_for(session).add(row)
    event_id: uuid.UUID = row["event_id"]
    return event_id


@dataclass(frozen=True, slots=True)
class Schemas:
    """The registry that validates a session's events, and how it reads the database."""

    registry: SchemaRegistry
    using: ConnectionSource | None = None


_default_registries: weakref.WeakKeyDictionary[Engine, SchemaRegistry] = weakref.WeakKeyDictionary()


def default_registry(engine: Engine) -> SchemaRegistry:
    """The schema registry in the outbox's own database (one per engine, cached)."""
    registry = _default_registries.get(engine)
    if registry is None:
        from outbox.schemas.registry import SchemaRegistry  # jsonschema only once it is needed

        registry = _default_registries.setdefault(engine, SchemaRegistry(engine))
    return registry


def schemas_for(session: Session | Connection, options: ProducerOptions) -> Schemas | None:
    """How ``session``'s events are validated: the configured registry, else the
    outbox database's own, read through the session's connection (inside its
    transaction: no second connection from the pool); None when validation is off.
    """
    if not options.validate:
        return None
    if isinstance(session, Connection):
        connection = session
        engine = connection.engine
        using: ConnectionSource = lambda: connection  # noqa: E731
    else:
        engine = _engine_of(session)
        using = session.connection
    if options.schemas is not None:
        same_database = options.schemas.engine is engine
        return Schemas(options.schemas, using if same_database else None)
    return Schemas(default_registry(engine), using)


def _engine_of(session: Session) -> Engine:
    bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def options_of(info: Mapping[str, Any]) -> ProducerOptions:
    options = info.get(OPTIONS_KEY, DEFAULT_OPTIONS)
    assert isinstance(options, ProducerOptions)
    return options


_partition_counts: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def partition_count(connection: Connection) -> int:
    """How many partitions the outbox was installed with (read once per engine)."""
    engine = connection.engine
    count = _partition_counts.get(engine)
    if count is None:
        count = connection.execute(select(func.count()).select_from(table.partition)).scalar_one()
        if not count:
            raise SchemaNotMigrated("outbox_partition is empty: run `outbox migrate`")
        _partition_counts[engine] = count
    return count


_PG_LOCK = text(
    "SELECT count(pg_advisory_xact_lock(:namespace, k)) FROM unnest(CAST(:keys AS integer[])) AS k"
)
_PG_LOCK_AND_NOTIFY = text(
    "SELECT pg_notify(:channel, ''), "
    "(SELECT count(pg_advisory_xact_lock(:namespace, k)) "
    "FROM unnest(CAST(:keys AS integer[])) AS k)"
)


def write_rows(
    connection: Connection, rows: Sequence[dict[str, Any]], options: ProducerOptions
) -> None:
    """Lock the rows' keys in a fixed order, then insert them in one statement."""
    if not rows:
        return
    partitions = partition_count(connection)
    routed = any("exchange" in row for row in rows)
    for row in rows:
        row["partition"] = ordering.partition_of(row["ordering_key"], partitions)
        if routed:  # one INSERT: every row names the same columns
            row.setdefault("exchange", None)
    if connection.dialect.name == "postgresql":
        # Sorted, de-duplicated lock ids: every writer acquires in the same
        # order, so no two transactions can wait on each other's keys.
        keys = sorted({ordering.lock_id(r["ordering_key"]) for r in rows})
        channel = table.NOTIFY_CHANNEL
        params = {"namespace": ordering.LOCK_NAMESPACE, "keys": keys, "channel": channel}
        connection.execute(_PG_LOCK_AND_NOTIFY if options.notify else _PG_LOCK, params)
    # SQLite needs no lock: it admits one writer at a time until commit.
    # On PostgreSQL this is psycopg's pipelined executemany: one round trip for
    # all rows, measured faster here than one multi-row VALUES or an unnest of
    # arrays (docs/performance.md).
    connection.execute(table.event.insert(), list(rows))


class _SessionBuffer(SavepointLog[dict[str, Any]]):
    """Events published in the session's transaction, written at commit or ``flush_events``."""

    def write(self, session: Session) -> None:
        rows = self.take_for_writing(session)
        if rows:
            write_rows(session.connection(), rows, options_of(session.info))


def _buffer_for(session: Session) -> _SessionBuffer:
    if not session.info.get(_LISTENING_KEY):
        session.info[_LISTENING_KEY] = True
        event.listen(session, "before_commit", _before_commit)
        track(session, _BUFFER_KEY, _SessionBuffer)
    return log_for(session, _BUFFER_KEY, _SessionBuffer)


def _before_commit(session: Session) -> None:
    buffer = session.info.get(_BUFFER_KEY)
    if isinstance(buffer, _SessionBuffer):
        # Flush the resource changes first: their row locks come before the
        # per-key lock, the order the session hooks use too, so an explicit
        # publish and an instrumented change cannot deadlock on one resource.
        session.flush()
        buffer.write(session)


def flush_events(session: Session) -> None:
    """Write the session's buffered events now (they are written at commit anyway)."""
    buffer = session.info.get(_BUFFER_KEY)
    if isinstance(buffer, _SessionBuffer):
        buffer.write(session)


def write_session_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` now, with the events ``publish`` buffered in ``session``, in one INSERT.

    The session hooks call it at commit. A transaction in which nothing was
    published has no buffer (registering its listeners costs more than the write).
    """
    buffer = session.info.get(_BUFFER_KEY)
    if isinstance(buffer, _SessionBuffer):
        for row in rows:
            buffer.add(row)
        buffer.write(session)
    else:
        write_rows(session.connection(), rows, options_of(session.info))
