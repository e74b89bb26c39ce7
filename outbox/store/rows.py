"""The values that cross the store's seam: rows the relay publishes, leases, the backlog.

Plain data with no SQL, so that what builds messages from rows (the relay)
or reads them (the registry, replay, operations) needs nothing of the SQL
module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple


class EventRow(NamedTuple):
    """One outbox row as the relay sees it.

    A named tuple, not a frozen dataclass: the relay builds one per event on its
    hot path, and a frozen dataclass's ``__init__`` costs five times as much.
    Field order is the column order of :data:`outbox.store.pgfast.FETCH`.
    """

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> EventRow:
        """From a SQLAlchemy row's mapping, whose event_id is a UUID."""
        return cls(**{**row, "event_id": str(row["event_id"])})

    position: int
    # The event's UUID as text, as it is sent (a UUID object per row costs more
    # than the rest of the row's decoding: the stores read it as text).
    event_id: str
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
