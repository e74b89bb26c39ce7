"""Create the outbox tables.

Revision ID: outbox_0001
Revises:
Create Date: 2026-11-26

The partition count is fixed here, at install time: pass
``-x outbox_partitions=N`` to alembic or ``--partitions N`` to ``outbox migrate``
(default 16).

``outbox_inbox`` is the consumers' table (``outbox.consumer``): it is created
here unless it exists already, so that ``outbox migrate`` also installs into a
consumer's database where an earlier release created the inbox at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "outbox_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("outbox",)
depends_on: str | Sequence[str] | None = None

DEFAULT_PARTITIONS = 16
_Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _partition_count() -> int:
    configured = context.config.attributes.get("outbox_partitions")
    if configured is None:
        configured = context.get_x_argument(as_dictionary=True).get(
            "outbox_partitions", DEFAULT_PARTITIONS
        )
    count = int(configured)
    if not 1 <= count <= 1024:
        raise ValueError(f"outbox_partitions must be between 1 and 1024, got {count}")
    return count


def upgrade() -> None:
    op.create_table(
        "outbox_event",
        sa.Column("position", _Position, sa.Identity(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("ordering_key", sa.Text(), nullable=False),
        sa.Column("partition", sa.SmallInteger(), nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), server_default=sa.text("'pending'"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'dead', 'skipped')",
            name=op.f("ck_outbox_event_state_known"),
        ),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_outbox_event")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_event_id")),
    )
    op.create_index(
        "ix_outbox_event_pending",
        "outbox_event",
        ["position"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_outbox_event_dead_key",
        "outbox_event",
        ["ordering_key", "position"],
        postgresql_where=sa.text("state = 'dead'"),
        sqlite_where=sa.text("state = 'dead'"),
    )
    op.create_index(
        "ix_outbox_event_delivered_at",
        "outbox_event",
        ["delivered_at"],
        postgresql_where=sa.text("state = 'delivered'"),
        sqlite_where=sa.text("state = 'delivered'"),
    )
    op.create_index("ix_outbox_event_key_position", "outbox_event", ["ordering_key", "position"])

    partition = op.create_table(
        "outbox_partition",
        sa.Column("partition", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("epoch", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("partition", name=op.f("pk_outbox_partition")),
    )
    op.bulk_insert(partition, [{"partition": p} for p in range(_partition_count())])

    op.create_table(
        "outbox_relay",
        sa.Column("relay_id", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "heartbeat_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("relay_id", name=op.f("pk_outbox_relay")),
    )
    op.create_table(
        "outbox_schema",
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column(
            "registered_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "format IN ('jsonschema', 'avro')", name=op.f("ck_outbox_schema_format_known")
        ),
        sa.PrimaryKeyConstraint("uri", "version", name=op.f("pk_outbox_schema")),
    )
    # A consumer's database may hold the inbox already, made by
    # outbox.consumer.create_inbox_table of a release that created the table
    # itself instead of applying these migrations: the same table, taken over.
    if not sa.inspect(op.get_bind()).has_table("outbox_inbox"):
        op.create_table(
            "outbox_inbox",
            sa.Column("consumer", sa.Text(), nullable=False),
            sa.Column("message_id", sa.Text(), nullable=False),
            sa.Column(
                "processed_at",
                sa.DateTime(timezone=True),
                server_default=sa.func.now(),
                nullable=False,
            ),
            sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_outbox_inbox")),
        )
    op.create_table(
        "outbox_dead_audit",
        sa.Column("id", _Position, sa.Identity(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_dead_audit")),
    )

    if op.get_bind().dialect.name == "postgresql":
        # Every row is inserted once and updated once (delivered), then purged:
        # vacuum the table far more eagerly than the 20% default so that dead
        # tuples and index bloat stay bounded under sustained load.
        op.execute(
            "ALTER TABLE outbox_event SET ("
            "autovacuum_vacuum_scale_factor = 0.01, "
            "autovacuum_vacuum_threshold = 1000, "
            "autovacuum_vacuum_insert_scale_factor = 0.05, "
            "autovacuum_analyze_scale_factor = 0.02, "
            "fillfactor = 90)"
        )


def downgrade() -> None:
    op.drop_table("outbox_dead_audit")
    op.drop_table("outbox_inbox")
    op.drop_table("outbox_schema")
    op.drop_table("outbox_relay")
    op.drop_table("outbox_partition")
    op.drop_index("ix_outbox_event_key_position", table_name="outbox_event")
    op.drop_index("ix_outbox_event_delivered_at", table_name="outbox_event")
    op.drop_index("ix_outbox_event_dead_key", table_name="outbox_event")
    op.drop_index("ix_outbox_event_pending", table_name="outbox_event")
    op.drop_table("outbox_event")
