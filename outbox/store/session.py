"""Bounded waits for the relay's database sessions, derived from the lease TTL.

A relay that stops inside a transaction (SIGSTOP, a frozen VM, a network cut)
keeps its row locks; without limits the relay that takes over its partitions
waits on them in its own mark, and nothing is delivered until the frozen one
wakes up. Every session the relay opens (its pool and the NOTIFY listener)
therefore starts with, for a lease TTL ``T``:

- ``idle_in_transaction_session_timeout`` = T/3: the server ends a session
  idle inside a transaction, releasing its locks, before that relay's leases
  expire (T), so a survivor claiming them never finds them locked. The relay's
  own transactions are idle for microseconds between statements;
- ``lock_timeout`` = T/5, one rebalance period: a relay waiting on a lock
  gives up (``StoreUnavailable``, retried with back-off) in time to renew its
  own leases, which it would lose locally after 0.8 T;
- ``statement_timeout`` = 4 T: a backstop, far above the relay's queries
  (index scans by position; the backlog count and the retention purge read
  partial indexes, seconds on tables of millions of rows);
- TCP keepalives, both ways, probing after ceil(T/5) s of silence every
  ceil(T/5) s, 3 probes, and ``tcp_user_timeout`` = T: a peer cut off by the
  network is found dead within about T instead of the kernel's 2 hours. The
  client side (libpq) unblocks a relay waiting on a vanished server; the
  server side (``tcp_*`` settings) drops the session of a vanished relay.

The settings go in libpq's ``options`` startup parameter, so they hold for
every pooled connection from its first statement. Options already in the URL
or in ``PGOPTIONS`` are kept and come last, so an explicit ``-c`` wins.
"""

from __future__ import annotations

import math
import os
from typing import Any

from sqlalchemy.engine import URL

KEEPALIVE_PROBES = 3


def session_limits(lease_ttl: float) -> dict[str, int]:
    """The server settings (PostgreSQL units: milliseconds, keepalives in seconds)."""
    ttl_ms = lease_ttl * 1000
    probe = max(1, math.ceil(lease_ttl / 5))
    return {
        "idle_in_transaction_session_timeout": max(1, round(ttl_ms / 3)),
        "lock_timeout": max(1, round(ttl_ms / 5)),
        "statement_timeout": max(1, round(ttl_ms * 4)),
        "tcp_keepalives_idle": probe,
        "tcp_keepalives_interval": probe,
        "tcp_keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": max(1, round(ttl_ms)),
    }


def relay_connect_args(url: URL, lease_ttl: float) -> dict[str, Any]:
    """psycopg connect arguments for a relay session on PostgreSQL (``{}`` otherwise).

    Keepalive parameters given in the URL are left as they are.
    """
    if url.get_backend_name() != "postgresql":
        return {}
    limits = session_limits(lease_ttl)
    options = " ".join(f"-c {name}={value}" for name, value in limits.items())
    given = url.query.get("options") or os.environ.get("PGOPTIONS")
    if isinstance(given, tuple):
        given = " ".join(given)
    if given:
        options = f"{options} {given}"
    libpq: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": limits["tcp_keepalives_idle"],
        "keepalives_interval": limits["tcp_keepalives_interval"],
        "keepalives_count": limits["tcp_keepalives_count"],
        "tcp_user_timeout": limits["tcp_user_timeout"],
    }
    args = {name: value for name, value in libpq.items() if name not in url.query}
    args["options"] = options
    return args
