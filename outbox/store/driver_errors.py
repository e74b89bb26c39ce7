"""Where database driver errors become the outbox's own: the one translation.

The relay retries :class:`StoreUnavailable` with back-off and stops on any
other :class:`StoreError`, so the split below decides whether a fault heals
itself; messages are redacted here because the driver's text can carry the URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, NoSuchTableError, OperationalError, SQLAlchemyError

from outbox.errors import SchemaNotMigrated, StoreError, StoreUnavailable
from outbox.redaction import redact

# lock_not_available, query_canceled and idle_in_transaction_session_timeout:
# the relay's own session limits (outbox.store.session) firing; the session
# heals by reconnecting, so these are outages, not defects.
_TRANSIENT_SQLSTATES = frozenset({"55P03", "57014", "25P03"})


def store_error(exc: SQLAlchemyError) -> StoreError:
    """``exc`` as a :class:`StoreError`: unmigrated, unavailable, or another database error."""
    if isinstance(exc, NoSuchTableError):
        return SchemaNotMigrated("the outbox tables do not exist: run `outbox migrate`")
    orig = getattr(exc, "orig", None)
    message = redact(str(orig) if orig is not None else str(exc)).strip()
    first_line = message.splitlines()[0] if message else type(exc).__name__
    if "outbox_" in message and ("does not exist" in message or "no such table" in message):
        return SchemaNotMigrated(
            f"the outbox tables do not exist ({first_line}): run `outbox migrate`"
        )
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if (
        isinstance(exc, OperationalError)
        or invalidated
        or getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES
    ):
        return StoreUnavailable(f"database unavailable: {first_line}")
    return StoreError(f"database error: {first_line}")


@contextmanager
def translated() -> Iterator[None]:
    """Raise any SQLAlchemy error of the block as :func:`store_error` says."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise store_error(exc) from exc
