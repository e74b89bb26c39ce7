"""The relay's hot queries on PostgreSQL, run on the psycopg connection directly.

:class:`outbox.store.SqlStore` builds every other query with SQLAlchemy; these
two run once per batch and carry its rows, where SQLAlchemy's result layer
costs several times the query itself. So, on the same pooled connection and
inside the store's transaction:

- marking and fetching go to the server in one round trip (psycopg pipeline
  mode), in one transaction: the fetch sees the mark, so rows just marked
  need no exclusion;
- both are server-side prepared statements taking arrays
  (``position = ANY(%s)``), so their text never changes with the batch size;
- arrays of positions and event ids go as array literals (``{1,2,3}``), one
  string each: psycopg's list dumper costs about a microsecond per element in
  Python, and a fetch carries up to three positions per row it asks for (what
  the relay holds out of it);
- rows come back as :class:`~outbox.store.EventRow` straight from psycopg's
  row factory.

The mark's transaction commits with ``synchronous_commit = off``: the relay
does not wait for the WAL flush. Should PostgreSQL crash within that instant,
the mark is lost, those rows are still pending and get published again with
their message ids: a duplicate, which at-least-once delivery already allows,
never a loss or a reordering. The producer's transactions are unaffected.

Ownership fence: with ``owner`` set, the partitions ``owner`` holds by a
lease unexpired on the database's clock are read in the same round trip,
before the fetch (``HELD``), and the rows are kept only if the fence allows
them: :func:`outbox.store.fence.fetchable`, the rule SQLite's path applies too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from psycopg.rows import args_row

from outbox.store import fence

# event_id as text: see EventRow.
_COLUMNS = (
    "position, event_id::text, ordering_key, partition, routing_key, resource_type, "
    "payload, headers::text, schema_version, created_at, attempts, exchange"
)
# A schema before revision outbox_0003 (no exchange column): the relay's exchange for all.
_COLUMNS_BEFORE_0003 = _COLUMNS.replace(", exchange", ", NULL::text AS exchange")
_HELD = (
    "NOT EXISTS (SELECT FROM outbox_event AS dead WHERE dead.state = 'dead'"
    " AND dead.ordering_key = e.ordering_key AND dead.position < e.position)"
)
# skip_keys: keys the relay holds back itself (no queue bound for their next event).
# NOT IN a subquery, not "<> ALL(array)": the server hashes the subquery's values
# once, while "<> ALL" over a parameter compares every row with every element
# in the generic plan a prepared statement ends up with (5 ms instead of 0.65 ms
# for a fetch of 500 rows with 1,500 positions held out). Neither holds a NULL.
FETCH = (
    f"SELECT {_COLUMNS} FROM outbox_event AS e"
    " WHERE e.state = 'pending' AND e.partition = ANY(%(partitions)s::smallint[])"
    " AND e.position NOT IN (SELECT unnest(%(exclude)s::bigint[]))"
    " AND e.ordering_key NOT IN (SELECT unnest(%(skip_keys)s::text[]))"
    f" AND {_HELD} ORDER BY e.position LIMIT %(limit)s"
)
FETCH_BEFORE_0003 = FETCH.replace(_COLUMNS, _COLUMNS_BEFORE_0003)
# The partitions ``owner`` holds right now: what the fence compares the request with.
HELD = "SELECT partition FROM outbox_partition WHERE owner = %(owner)s AND lease_expires_at > now()"
MARK = (
    "UPDATE outbox_event SET state = 'delivered', delivered_at = now(),"
    " attempts = attempts + 1, last_error = NULL"
    " WHERE position = ANY(%(positions)s::bigint[]) AND state = 'pending'"
)
MARK_DELETE = (
    "DELETE FROM outbox_event WHERE position = ANY(%(positions)s::bigint[]) AND state = 'pending'"
)
# By position and event id, pairwise (see Store.mark_delivered): a join, one
# index lookup per pair, where "AND event_id = ANY(...)" would compare each row
# with every id of the batch.
_EXACT = (
    " unnest(%(positions)s::bigint[], %(ids)s::uuid[]) AS m(position, event_id)"
    " WHERE e.position = m.position AND e.event_id = m.event_id AND e.state = 'pending'"
)
MARK_EXACT = (
    "UPDATE outbox_event AS e SET state = 'delivered', delivered_at = now(),"
    " attempts = e.attempts + 1, last_error = NULL FROM" + _EXACT
)
MARK_DELETE_EXACT = "DELETE FROM outbox_event AS e USING" + _EXACT
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"


def int_array(values: Iterable[int]) -> str:
    """``values`` as a PostgreSQL array literal for a ``::bigint[]`` cast: ``{1,2,3}``."""
    return "{" + ",".join(map(str, map(int, values))) + "}"


def uuid_array(values: Sequence[str]) -> str:
    """UUIDs in text as a PostgreSQL array literal for a ``::uuid[]`` cast.

    The relay's ids are ``event_id::text``, so they need no quoting; anything
    but hex digits and dashes is refused rather than quoted (a comma would
    split one id into two elements).
    """
    if not values:
        return "{}"
    text = ",".join(values)
    if text.count(",") != len(values) - 1 or _UUID_LIST.fullmatch(text) is None:
        raise ValueError("uuid_array takes UUIDs as text only")
    return "{" + text + "}"


_UUID_LIST = re.compile(r"[0-9a-fA-F-]+(?:,[0-9a-fA-F-]+)*")


def mark_and_fetch(
    connection: Any,
    *,
    row_class: type[Any],
    mark: Sequence[int],
    partitions: Sequence[int],
    limit: int,
    exclude: Collection[int],
    owner: str | None,
    delete_rows: bool,
    prepare: bool = True,
    skip_keys: Sequence[str] = (),
    row_exchanges: bool = True,
    mark_ids: Sequence[str] | None = None,
) -> tuple[int, list[Any]]:
    """Mark ``mark`` delivered, then fetch; returns (rows marked, rows fetched).

    ``connection`` is a psycopg connection inside an open transaction, which
    is committed in the same round trip (the caller's commit is then a no-op).
    """

    marked = 0
    with connection.pipeline():
        mark_cursor = connection.cursor()
        if mark:
            connection.cursor().execute(ASYNC_COMMIT)
            query = MARK_DELETE if delete_rows else MARK
            args = {"positions": int_array(mark)}
            if mark_ids is not None:
                query = MARK_DELETE_EXACT if delete_rows else MARK_EXACT
                args["ids"] = uuid_array(mark_ids)
            mark_cursor.execute(query, args, prepare=prepare)
        # The columns in the order of the row class's fields: built positionally.
        fetch_cursor = connection.cursor(row_factory=args_row(row_class))
        held_cursor = None
        fetched = False
        if partitions and limit > 0:
            if owner is not None:
                # In the pipeline too: no round trip of its own. The fetch runs
                # regardless; the fence decides below whether its rows count.
                held_cursor = connection.cursor()
                held_cursor.execute(HELD, {"owner": owner}, prepare=prepare)
            params: dict[str, Any] = {
                "partitions": list(partitions),
                "exclude": int_array(exclude),
                "skip_keys": list(skip_keys),
                "limit": limit,
            }
            query = FETCH if row_exchanges else FETCH_BEFORE_0003
            fetch_cursor.execute(query, params, prepare=prepare)
            fetched = True
        # No window in which a relay frozen after the round trip sits idle in
        # the transaction holding the mark's row locks: the server would not
        # end it, since psycopg closes a pipeline with Sync then Flush, and the
        # Flush disarms idle_in_transaction_session_timeout (outbox.store.session).
        connection.cursor().execute("COMMIT")
    if mark:
        marked = mark_cursor.rowcount
    rows: list[Any] = fetch_cursor.fetchall() if fetched else []
    if held_cursor is not None:
        held = [partition for (partition,) in held_cursor.fetchall()]
        if not fence.fetchable(partitions, held):
            rows = []
    return marked, rows
