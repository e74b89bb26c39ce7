"""Engines from URLs: the one place that knows driver defaults.

A plain ``postgresql://`` URL uses psycopg 3; SQLite gets WAL and a busy
timeout so that the producer and the relay can share one file.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from outbox.errors import ConfigurationError
from outbox.redaction import (
    describe_url,
    is_keyword_dsn,
    redact,
    register_secret,
    register_secrets_in,
)

__all__ = ["create_outbox_engine", "normalize_url", "redact"]  # redact: moved to outbox.redaction


def normalize_url(url: str | URL) -> URL:
    """Parse a SQLAlchemy URL, choosing psycopg 3 for bare PostgreSQL URLs."""
    if isinstance(url, str):
        register_secrets_in(url)  # also for callers that did not resolve settings
    elif url.password is not None:
        register_secret(str(url.password))
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        if isinstance(url, str) and is_keyword_dsn(url):
            raise ConfigurationError(
                f"database URL {redact(url)!r} is a libpq keyword/value string; keyword "
                "DSNs are not accepted: use a URL such as postgresql://user@host:5432/dbname, "
                "with the password (percent-encoded) after the user name and a colon"
            ) from None
        raise ConfigurationError(
            f"database URL {describe_url(str(url))!r} is not a SQLAlchemy URL; "
            "expected e.g. postgresql://user@host:5432/dbname or sqlite:///outbox.db"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_outbox_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for the outbox tables, with sane defaults per dialect."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30})
    else:
        kwargs.setdefault("pool_pre_ping", True)
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigurationError(f"cannot use database URL {redact(str(url))!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _tune_sqlite)
    return engine


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the relay read while a producer writes; NORMAL is durable in WAL mode
    # except for the last transactions on power loss.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
