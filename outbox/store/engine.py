"""Engines from URLs: the one place that knows driver defaults.

A plain ``postgresql://`` URL uses psycopg 3; SQLite gets WAL and a busy
timeout so that the producer and the relay can share one file.

A PostgreSQL URL may list several hosts, for a primary and its standbys
(docs/replicas.md): SQLAlchemy's ``?host=h1:5432&host=h2:5432``, libpq's
``?host=h1,h2&port=5432,5432`` or libpq's ``postgresql://h1:5432,h2:5432/db``.
All three become libpq's query form, the one psycopg (through SQLAlchemy's
dialect) and libpq itself (the relay's LISTEN connection) read alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
    if isinstance(url, str):
        url = _hosts_to_query(url)
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
    if parsed.get_backend_name() == "postgresql":
        parsed = _libpq_host_list(parsed)
    return parsed


# libpq's postgresql://[user[:password]@]h1:p1,h2:p2/db?...: SQLAlchemy would read
# "p1,h2:p2" as the port. No "@" after the user part (SQLAlchemy's own rule).
_NETLOC_HOST_LIST = re.compile(
    r"(?P<head>postgres(?:ql)?(?:\+\w+)?://(?:[^@]*@)?)(?P<hosts>[^/?#@]*,[^/?#@]*)"
    r"(?P<path>/[^?#]*)?(?:\?(?P<query>[^#]*))?"
)


def _hosts_to_query(url: str) -> str:
    """libpq's host list in the netloc moved to the query, where SQLAlchemy reads it."""
    match = _NETLOC_HOST_LIST.fullmatch(url.strip())
    if match is None or re.search(r"(?:^|&)(?:host|port)=", match["query"] or ""):
        return url
    hosts, ports = _hosts_and_ports(match["hosts"].split(","))
    query = f"host={','.join(hosts)}" + (f"&port={','.join(ports)}" if any(ports) else "")
    rest = f"&{match['query']}" if match["query"] else ""
    return f"{match['head']}{match['path'] or '/'}?{query}{rest}"


def _libpq_host_list(url: URL) -> URL:
    """SQLAlchemy's ``?host=h1:p1&host=h2:p2`` as libpq's ``?host=h1,h2&port=p1,p2``.

    psycopg gets the same either way, but libpq reads only the latter: given
    the former, it would take the last ``host`` and resolve ``h2:p2`` as a name.
    """
    given = url.query.get("host")
    if given is None or "port" in url.query:
        return url
    tokens = given if isinstance(given, tuple) else tuple(given.split(","))
    hosts, ports = _hosts_and_ports(tokens)
    if not any(ports) and isinstance(given, str):
        return url  # already libpq's form, or one host (a socket directory) without a port
    query = {"host": ",".join(hosts), **({"port": ",".join(ports)} if any(ports) else {})}
    return url.update_query_dict(query)


def _hosts_and_ports(tokens: Iterable[str]) -> tuple[list[str], list[str]]:
    """The hosts and the ports ("" where none) of libpq host tokens, in order."""
    pairs = [_host_and_port(token) for token in tokens]
    return [host for host, _ in pairs], [port for _, port in pairs]


def _host_and_port(token: str) -> tuple[str, str]:
    """``host:port``, ``[v6]:port``, ``host`` or ``/socket/dir`` as (host, port or "")."""
    if token.startswith("["):
        address, _, rest = token[1:].partition("]")
        return address, rest.removeprefix(":")
    host, colon, port = token.rpartition(":")
    if colon and port.isdigit() and ":" not in host and not token.startswith("/"):
        return host, port
    return token, ""


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
