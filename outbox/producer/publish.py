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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, func, select, text
from sqlalchemy.orm import Session, SessionTransaction

from outbox.envelope import codec, fastcheck, limits, ordering
from outbox.envelope.model import Envelope
from outbox.errors import SchemaNotMigrated, UnsendableEventError
from outbox.producer import tracing
from outbox.store import table

if TYPE_CHECKING:
    from outbox.schemas.registry import ConnectionSource, SchemaRegistry

OPTIONS_KEY = "outbox.producer_options"
_BUFFER_KEY = "outbox.buffer"


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


@dataclass(eq=False)
class _SessionBuffer:
    """Events published in a session, tagged with a sequence number.

    A SAVEPOINT remembers a unique token and the sequence number at which it
    began. Rolling it back drops the events published inside it, written or
    not (the database undoes the written ones). Rows written while it was open
    but published before it began (a ``flush_events`` or the release of an
    inner SAVEPOINT writes every buffered row) are undone by the database too,
    yet belong to the enclosing transaction: they go back into the buffer, in
    their original order, to be written again.
    """

    session: Session
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # Rows written while a SAVEPOINT was open, with the tokens of all open ones.
    written: list[tuple[int, dict[str, Any], frozenset[int]]] = field(default_factory=list)
    next_seq: int = 0
    next_token: int = 0
    # id(SessionTransaction) -> (token, first sequence number inside it)
    savepoints: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append((self.next_seq, row))
        self.next_seq += 1

    def write(self) -> None:
        if not self.rows:
            return
        open_tokens = self._open_savepoint_tokens()
        if open_tokens:
            self.written.extend((seq, row, open_tokens) for seq, row in self.rows)
        rows = [row for _, row in self.rows]
        self.rows.clear()
        write_rows(self.session.connection(), rows, options_of(self.session.info))

    def _open_savepoint_tokens(self) -> frozenset[int]:
        tokens: set[int] = set()
        current: SessionTransaction | None = self.session.get_nested_transaction()
        while current is not None and current.nested:
            entry = self.savepoints.get(id(current))
            if entry is not None:
                tokens.add(entry[0])
            current = current.parent
        return frozenset(tokens)

    def savepoint_started(self, transaction: SessionTransaction, start: int | None = None) -> None:
        seq = self.next_seq if start is None else start
        self.savepoints[id(transaction)] = (self.next_token, seq)
        self.next_token += 1

    def savepoint_rolled_back(self, transaction: SessionTransaction) -> None:
        entry = self.savepoints.pop(id(transaction), None)
        if entry is None:
            return
        token, start = entry
        undone = [(seq, row) for seq, row, tokens in self.written if token in tokens]
        self.written = [w for w in self.written if token not in w[2]]
        kept = [(seq, row) for seq, row in self.rows if seq < start]
        kept += [(seq, row) for seq, row in undone if seq < start]
        self.rows = sorted(kept, key=lambda item: item[0])

    def transaction_ended(self, transaction: SessionTransaction) -> None:
        # A SAVEPOINT's entry is kept when it ends: SQLAlchemy ends a nested
        # transaction *before* it reports its rollback (after_soft_rollback).
        # Tokens are unique, so a stale entry can never match a later SAVEPOINT.
        if transaction.parent is None:
            # The root transaction is over: its events were written at
            # before_commit, or are discarded with its rollback.
            self.rows.clear()
            self.written.clear()
            self.savepoints.clear()


def _buffer_for(session: Session) -> _SessionBuffer:
    buffer = session.info.get(_BUFFER_KEY)
    if buffer is None:
        buffer = _SessionBuffer(session)
        session.info[_BUFFER_KEY] = buffer
        _listen(session, buffer)
        current: SessionTransaction | None = session.get_nested_transaction()
        while current is not None and current.nested:
            # Events published now belong to every open SAVEPOINT around them.
            buffer.savepoint_started(current, start=0)
            current = current.parent
    assert isinstance(buffer, _SessionBuffer)
    return buffer


def _listen(session: Session, buffer: _SessionBuffer) -> None:
    def before_commit(session: Session) -> None:
        # Flush the resource changes first: their row locks come before the
        # per-key lock, the order the session hooks use too, so an explicit
        # publish and an instrumented change cannot deadlock on one resource.
        session.flush()
        buffer.write()

    def after_transaction_create(_session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            buffer.savepoint_started(transaction)

    def after_soft_rollback(_session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            buffer.savepoint_rolled_back(transaction)

    def after_transaction_end(_session: Session, transaction: SessionTransaction) -> None:
        buffer.transaction_ended(transaction)

    event.listen(session, "before_commit", before_commit)
    event.listen(session, "after_transaction_create", after_transaction_create)
    event.listen(session, "after_soft_rollback", after_soft_rollback)
    event.listen(session, "after_transaction_end", after_transaction_end)


def flush_events(session: Session) -> None:
    """Write the session's buffered events now (they are written at commit anyway)."""
    buffer = session.info.get(_BUFFER_KEY)
    if isinstance(buffer, _SessionBuffer):
        buffer.write()


def write_session_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` now, with the events ``publish`` buffered in ``session``, in one INSERT.

    The session hooks call it at commit. A session that never published gets
    no buffer (registering its listeners costs more than the write).
    """
    buffer = session.info.get(_BUFFER_KEY)
    if isinstance(buffer, _SessionBuffer):
        for row in rows:
            buffer.add(row)
        buffer.write()
    else:
        write_rows(session.connection(), rows, options_of(session.info))
