"""Purging delivered rows after the retention period, in small batches."""

from __future__ import annotations

import logging
import time

from outbox.errors import OutboxError
from outbox.logs import emit
from outbox.store.sqlstore import SqlStore

log = logging.getLogger(__name__)

PURGE_BATCH = 1000
PURGE_TIME_BUDGET = 20.0  # seconds per run; the next run carries on


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
