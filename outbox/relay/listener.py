"""PostgreSQL LISTEN in a background thread: wakes the relay when a producer commits.

A notification is a hint only: the relay still polls, so a lost notification
(listener reconnecting, notify turned off) delays an event, never loses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import psycopg
from sqlalchemy.engine import URL

from outbox.logs import emit
from outbox.redaction import redact
from outbox.relay.loop import Wakeup
from outbox.store.table import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


def libpq_url(url: URL) -> str:
    """The libpq form of a SQLAlchemy PostgreSQL URL (driver suffix removed)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class NotifyListener:
    def __init__(
        self,
        url: URL,
        wakeup: Wakeup,
        *,
        channel: str = NOTIFY_CHANNEL,
        connect_args: Mapping[str, Any] | None = None,
    ) -> None:
        self._conninfo = libpq_url(url)
        # The relay's session limits and keepalives (outbox.store.session): a
        # listener cut off from the server notices within about the lease TTL.
        self._connect_args = dict(connect_args or {})
        self._wakeup = wakeup
        self._channel = channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listen", daemon=True)
        self.listening = threading.Event()

    def start(self) -> None:
        emit(
            log,
            "listener_started",
            "waking up on NOTIFY %s; LISTEN needs a session connection: behind PgBouncer "
            "in transaction mode, run with --listen off (the relay then polls)",
            self._channel,
            channel=self._channel,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=5, **self._connect_args
                ) as conn:
                    conn.execute(f'LISTEN "{self._channel}"')
                    self.listening.set()
                    # Anything committed while we were not listening is found by this poll.
                    self._wakeup.set()
                    backoff = 0.5
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wakeup.set()
            except psycopg.Error as exc:
                self.listening.clear()
                emit(
                    log,
                    "listener_disconnected",
                    "LISTEN connection lost (%s); polling until it is back",
                    redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__,
                    level=logging.WARNING,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
