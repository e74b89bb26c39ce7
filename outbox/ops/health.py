"""The checks behind ``/livez`` and ``/readyz``."""

from __future__ import annotations

import threading
import time

from sqlalchemy import Engine

from outbox.errors import StoreError
from outbox.ops.http import Check
from outbox.ops.metrics import PrometheusObserver
from outbox.redaction import redact
from outbox.store import migrate


def liveness(observer: PrometheusObserver, max_silence: float) -> Check:
    """Alive while the loop ticked or reported a failure within ``max_silence`` seconds."""

    def check() -> tuple[bool, str]:
        silent = observer.seconds_since_sign_of_life()
        if silent > max_silence:
            return False, f"relay loop silent for {silent:.0f}s (limit {max_silence:.0f}s)"
        return True, f"relay loop active {silent:.1f}s ago"

    return check


def readiness(engine: Engine, *, cache_seconds: float = 2.0) -> Check:
    """Ready when the database answers and the outbox schema is at the head revision.

    The configuration was valid, or the relay would not have started. The
    broker is deliberately not checked (see docs/operations.md). Answers are
    cached briefly so that frequent probes cost the database one query.
    """
    lock = threading.Lock()
    cached: list[tuple[float, bool, str]] = []

    def evaluate() -> tuple[bool, str]:
        try:
            installed = migrate.installed_revision(engine)
        except StoreError as exc:  # reachable, but the revision cannot be read
            return False, str(exc)
        except Exception as exc:  # any driver error means "not reachable"
            first = redact(str(exc)).strip().splitlines()
            return False, f"database unreachable: {first[0] if first else type(exc).__name__}"
        head = migrate.head_revision(engine)
        if installed.revision != head:
            return (
                False,
                f"schema at revision {installed.revision or 'none'}, expected {head}: "
                f"run {installed.upgrade_command}",
            )
        return True, f"configuration valid, database reachable, schema at {head}"

    def check() -> tuple[bool, str]:
        with lock:
            now = time.monotonic()
            if cached and now - cached[0][0] < cache_seconds:
                return cached[0][1], cached[0][2]
            ok, detail = evaluate()
            cached[:] = [(now, ok, detail)]
            return ok, detail

    return check
