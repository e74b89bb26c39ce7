"""The values that cross the store's seam: rows the relay publishes, leases, the backlog.

Plain data with no SQL, so that what builds messages from rows (the relay)
or reads them (the registry, replay, operations) needs nothing of the SQL
module.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import NamedTuple


class EventRow(NamedTuple):
    """One outbox row as the relay sees it.

    A named tuple, not a frozen dataclass: the relay builds one per event on its
    hot path, and a frozen dataclass's ``__init__`` costs five times as much.
    Field order is the column order of :data:`outbox.store.pgfast.FETCH`.
    """

    position: int
    event_id: uuid.UUID
    ordering_key: str
    partition: int
    routing_key: str
    resource_type: str
    payload: str
    # The stored JSON text, parsed per row by the relay: a hostile document
    # (nested beyond the parser's depth) then fails that row, not the fetch.
    headers: str | None
    schema_version: int | None
    created_at: dt.datetime
    attempts: int
    # The exchange to publish to; None: the relay's own.
    exchange: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """Partitions this relay owns, with the epoch at which it acquired each."""

    epochs: dict[int, int]

    @property
    def partitions(self) -> list[int]:
        return sorted(self.epochs)


@dataclass(frozen=True, kw_only=True, slots=True)
class Backlog:
    pending: int
    dead: int
    oldest_pending_created_at: dt.datetime | None
