"""What every sub-command shares: the engine for ``--database-url`` and its errors."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from outbox.cli import settings as config
from outbox.errors import OutboxError
from outbox.store.driver_errors import store_error
from outbox.store.engine import create_outbox_engine


def engine_from(settings: config.Settings) -> Engine:
    """The engine for ``--database-url``; commands dispose of it when done."""
    return create_outbox_engine(config.require(settings.database.url, "database_url"))


def as_store_error(exc: Exception) -> OutboxError:
    """``exc`` as the error a command reports; anything not from the database is re-raised."""
    if isinstance(exc, OutboxError):
        return exc
    if isinstance(exc, SQLAlchemyError):
        return store_error(exc)
    raise exc
