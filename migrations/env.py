"""Alembic environment for the outbox tables.

Our revisions are recorded in their own version table (``outbox_alembic_version``)
so that they never collide with a service's ``alembic_version``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from outbox.store.engine import create_outbox_engine
from outbox.store.table import metadata

VERSION_TABLE = "outbox_alembic_version"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("OUTBOX_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set OUTBOX_DATABASE_URL or sqlalchemy.url in alembic.ini")
    engine = create_outbox_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
