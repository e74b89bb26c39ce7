"""A per-row exchange: the destination a resource declares, stored with its event.

Revision ID: outbox_0003
Revises: outbox_0002
Create Date: 2026-12-02

``outbox_event.exchange`` names the exchange the relay publishes the row to;
NULL (every row written before this revision) means the relay's own
``--exchange``, as before. Adding a nullable column without a default changes
only PostgreSQL's catalogue: no table rewrite, no scan, a brief lock. SQLite
adds the column in place too (``ALTER TABLE ... ADD COLUMN``); dropping it
again rebuilds the table (batch mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "outbox_0003"
down_revision: str | Sequence[str] | None = "outbox_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox_event", sa.Column("exchange", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox_event") as batch:  # SQLite rebuilds the table
        batch.drop_column("exchange")
