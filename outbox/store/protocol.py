"""The store as the relay sees it: the role :class:`~outbox.relay.loop.Relay` depends on.

Exactly what the relay calls, nothing more. :class:`~outbox.store.sqlstore.SqlStore`
is the implementation (SQLite through SQLAlchemy Core, PostgreSQL's hot path
through :mod:`outbox.store.pgfast`). The contract suite,
``tests/integration/store/test_store_contract.py``, is the behaviour every
implementation must show, run against each backend.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from outbox.store.rows import EventRow, Lease


class Store(Protocol):
    """Ordering, state transitions and partition leases of the outbox rows."""

    def mark_and_fetch(
        self,
        mark: Sequence[int],
        partitions: Sequence[int],
        limit: int,
        exclude: Collection[int] = (),
        *,
        owner: str | None = None,
        delete_rows: bool = False,
        skip_keys: Collection[str] = (),
        mark_ids: Sequence[str] | None = None,
    ) -> list[EventRow]:
        """Mark ``mark`` delivered, then return up to ``limit`` pending rows of ``partitions``.

        ``mark_ids``, the event ids of ``mark`` in the same order, make the
        mark exact: a row is marked only at its position *and* with its id
        (see :meth:`mark_delivered`).

        Rows come in position order, never one at a position in ``exclude``,
        of a key in ``skip_keys`` or of a key held behind a dead row. With
        ``owner``, the fetch is fenced (:func:`outbox.store.fence.fetchable`):
        nothing unless ``owner`` holds every partition of ``partitions`` by an
        unexpired lease, on the database's clock.
        """
        ...

    def mark_delivered(
        self,
        positions: Sequence[int],
        *,
        delete_rows: bool = False,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Record that the broker confirmed these pending rows; returns how many changed.

        With ``event_ids`` (the ids of ``positions``, in the same order) only a
        row with both its position and its id changes. The relay always gives
        them: after a failover to a standby that had not received every
        transaction, the new primary hands out positions again, and a
        position alone could name a new event the broker never saw.
        """
        ...

    def mark_dead(self, position: int, reason: str) -> None:
        """Mark a pending row dead: it holds its key until an operator retries or skips it."""
        ...

    def record_failure(self, positions: Sequence[int], error: str) -> None:
        """Count a failed attempt (and its error) on rows that stay pending."""
        ...

    def partition_count(self) -> int: ...

    def rebalance(self, relay_id: str, ttl: float) -> Lease:
        """Renew ``relay_id``'s leases for ``ttl`` seconds, then take its fair share.

        Claiming a partition bumps its epoch; the lease returned names each
        partition held with its epoch.
        """
        ...

    def release(self, relay_id: str) -> None:
        """Give up every partition of ``relay_id`` and leave the live relays."""
        ...
