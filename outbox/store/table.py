"""SQLAlchemy Core metadata: the single source of truth for every outbox table.

Migrations in ``migrations/`` must produce exactly this (a test compares them).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
    func,
    text,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# PostgreSQL's NOTIFY channel: producers notify it on commit, idle relays listen.
NOTIFY_CHANNEL = "outbox_event"

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
SKIPPED = "skipped"
STATES = (PENDING, DELIVERED, DEAD, SKIPPED)

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_Position = BigInteger().with_variant(Integer(), "sqlite")

event = Table(
    "outbox_event",
    metadata,
    # Assigned after the producer holds the per-key lock, so for one ordering
    # key position order is commit order (see docs/guarantees.md).
    Column("position", _Position, Identity(), primary_key=True),
    # Unique by construction (UUID4); indexed for undelivered rows only, below.
    Column("event_id", Uuid(), nullable=False),
    Column("ordering_key", Text(), nullable=False),
    Column("partition", SmallInteger(), nullable=False),
    Column("routing_key", Text(), nullable=False),
    # The exchange to publish to; NULL: the relay's own (--exchange).
    Column("exchange", Text(), nullable=True),
    Column("resource_type", Text(), nullable=False),
    Column("payload", Text(), nullable=False),
    # Extra message headers set by the producer (trace context, resource version...).
    # None is SQL NULL, not the JSON text 'null': no encoding per row, nothing stored.
    Column("headers", JSON(none_as_null=True), nullable=True),
    Column("schema_version", Integer(), nullable=True),
    Column("state", String(16), nullable=False, server_default=text("'pending'")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer(), nullable=False, server_default=text("0")),
    Column("last_error", Text(), nullable=True),
    CheckConstraint("state IN ('pending', 'delivered', 'dead', 'skipped')", name="state_known"),
    # Only pending rows are indexed for the relay, so millions of delivered
    # rows cost the hot query nothing.
    Index(
        "ix_outbox_event_pending",
        "position",
        postgresql_where=text("state = 'pending'"),
        sqlite_where=text("state = 'pending'"),
    ),
    Index(
        "ix_outbox_event_dead_key",
        "ordering_key",
        "position",
        postgresql_where=text("state = 'dead'"),
        sqlite_where=text("state = 'dead'"),
    ),
    Index(
        "ix_outbox_event_delivered_at",
        "delivered_at",
        postgresql_where=text("state = 'delivered'"),
        sqlite_where=text("state = 'delivered'"),
    ),
    # Operators look up dead rows and what waits behind them. Delivered rows
    # stay out: marking a row delivered then adds no entry to these indexes
    # (revision outbox_0002 says why that matters).
    Index(
        "ix_outbox_event_undelivered_id",
        "event_id",
        postgresql_where=text("state <> 'delivered'"),
        sqlite_where=text("state <> 'delivered'"),
    ),
    Index(
        "ix_outbox_event_undelivered_key",
        "ordering_key",
        "position",
        postgresql_where=text("state <> 'delivered'"),
        sqlite_where=text("state <> 'delivered'"),
    ),
)

partition = Table(
    "outbox_partition",
    metadata,
    Column("partition", SmallInteger(), primary_key=True, autoincrement=False),
    Column("owner", Text(), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    # Bumped on every change of owner: the relay compares epochs after each
    # rebalance and drops what it queued for a partition that changed hands.
    Column("epoch", BigInteger(), nullable=False, server_default=text("0")),
)

relay = Table(
    "outbox_relay",
    metadata,
    Column("relay_id", Text(), primary_key=True),
    Column("hostname", Text(), nullable=False),
    Column("pid", Integer(), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

schema = Table(
    "outbox_schema",
    metadata,
    Column("uri", Text(), primary_key=True),
    Column("version", Integer(), primary_key=True, autoincrement=False),
    Column("format", String(16), nullable=False),
    Column("document", Text(), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("format IN ('jsonschema', 'avro')", name="format_known"),
)

inbox = Table(
    "outbox_inbox",
    metadata,
    Column("consumer", Text(), primary_key=True),
    Column("message_id", Text(), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

dead_letter_audit = Table(
    "outbox_dead_audit",
    metadata,
    Column("id", _Position, Identity(), primary_key=True),
    Column("event_id", Uuid(), nullable=False),
    Column("operation", String(16), nullable=False),
    Column("actor", Text(), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

DEFAULT_PARTITIONS = 16
