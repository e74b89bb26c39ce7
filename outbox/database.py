"""Engines from URLs: the one place that knows driver defaults.

A plain ``postgresql://`` URL uses psycopg 3; SQLite gets WAL and a busy
timeout so that the producer and the relay can share one file.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from outbox.errors import ConfigurationError

_SECRET_IN_URL = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)(?=@)", re.I
)
_SECRET_IN_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|secret)=)[^&\s]*", re.I)


def redact(text: str) -> str:
    """Hide passwords in every URL inside ``text`` (for logs, errors and output)."""
    text = _SECRET_IN_URL.sub(lambda m: m.group("head") + "***", text)
    return _SECRET_IN_QUERY.sub(lambda m: m.group("head") + "***", text)


def normalize_url(url: str | URL) -> URL:
    """Parse a SQLAlchemy URL, choosing psycopg 3 for bare PostgreSQL URLs."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigurationError(
            f"database URL {redact(str(url))!r} is not a SQLAlchemy URL; "
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
