"""Purging delivered rows after the retention period, in small batches."""

from __future__ import annotations

import logging
import time
from typing import Any

from outbox.errors import OutboxError
from outbox.logs import emit
from outbox.store.sqlstore import SqlStore
from outbox.units import duration_seconds

log = logging.getLogger(__name__)

PURGE_BATCH = 1000
PURGE_TIME_BUDGET = 20.0  # seconds per run; the next run carries on


def retention_seconds(values: dict[str, Any]) -> float:
    """The ``retention`` setting in seconds (its default is written as text, ``7d``)."""
    value = values.get("retention", 0.0)
    return duration_seconds(value) if isinstance(value, str) else float(value)


def purge_delivered(
    store: SqlStore,
    retention: float,
    *,
    batch: int = PURGE_BATCH,
    time_budget: float = PURGE_TIME_BUDGET,
) -> int:
    """Delete rows delivered more than ``retention`` seconds ago; return how many.

    Each batch is its own short transaction that locks at most ``batch`` rows,
    which no one else is waiting for (delivered rows are never read by the
    relay), so producers and the relay never queue behind a purge.
    """
    deadline = time.monotonic() + time_budget
    total = 0
    try:
        while True:
            deleted = store.purge_delivered(retention, batch)
            total += deleted
            if deleted < batch or time.monotonic() >= deadline:
                break
    except OutboxError as exc:
        emit(
            log,
            "retention_purge_failed",
            "purge stopped after %d rows: %s",
            total,
            exc,
            level=logging.WARNING,
            purged=total,
        )
        return total
    if total:
        emit(
            log,
            "retention_purged",
            "purged %d delivered rows older than %ss",
            total,
            retention,
            purged=total,
            retention_seconds=retention,
        )
    return total
