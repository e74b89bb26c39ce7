"""The fetch fence: which partitions a relay may read, given the leases it holds.

All or nothing. A relay reads the partitions it asks for only while it holds
every one of them by an unexpired lease (on the database's clock); lacking
any, it reads none. The partitions a relay asks for are its view of its lease,
as its last rebalance returned it; once that view is wrong in one partition,
another relay's takeover has changed the picture, and what this relay has
queued or believes about its keys may be stale too. So it fetches nothing
until its next rebalance tells it what it holds, rather than going on with
the partitions it happens to keep.

Both backends apply this one function (:mod:`outbox.store.sqlstore` for
SQLite, :mod:`outbox.store.pgfast` for PostgreSQL); the store contract suite
(``tests/integration/store/test_store_contract.py``) holds them to it.
Marking is not fenced: a relay marks only rows the broker confirmed to it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def fetchable(requested: Sequence[int], held: Collection[int]) -> list[int]:
    """``requested`` if every one of them is in ``held``, else no partition at all."""
    held = set(held)
    return list(requested) if all(p in held for p in requested) else []
