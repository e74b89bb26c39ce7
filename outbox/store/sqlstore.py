"""All SQL the relay runs: fetching, state transitions, partition leases, status.

The store owns ordering (rows are handed out in position order, per owned
partition, skipping keys held by a dead row), leadership (partition leases with
an epoch as fencing token) and translation of driver errors into
:mod:`outbox.errors`, in one place.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import psycopg
from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy import all_ as sql_all
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError

from outbox.redaction import redact
from outbox.store import fence, pgfast, table
from outbox.store.driver_errors import translated
from outbox.store.rows import Backlog, EventRow, Lease

T = TypeVar("T")
E = table.event
P = table.partition
R = table.relay


_EVENT_COLUMNS = (
    E.c.position,
    E.c.event_id,
    E.c.ordering_key,
    E.c.partition,
    E.c.routing_key,
    E.c.resource_type,
    E.c.payload,
    type_coerce(E.c.headers, Text()).label("headers"),
    E.c.schema_version,
    E.c.created_at,
    E.c.attempts,
    E.c.exchange,
)


# Before revision outbox_0003 there is no exchange column: every row goes to the relay's.
_EVENT_COLUMNS_BEFORE_0003 = (*_EVENT_COLUMNS[:-1], null().label("exchange"))
_HAS_EXCHANGE_PG = text(
    "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('outbox_event')"
    " AND attname = 'exchange' AND NOT attisdropped)"
)
_HAS_EXCHANGE_SQLITE = text(
    "SELECT count(*) FROM pragma_table_info('outbox_event') WHERE name = 'exchange'"
)


class SqlStore:
    """The outbox store over any SQLAlchemy engine (PostgreSQL in production, SQLite embedded)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgresql = engine.dialect.name == "postgresql"
        # Off behind a transaction-mode pooler that cannot route them (PgBouncer < 1.21).
        self.prepared_statements = True
        self._row_exchanges = False

    def row_exchanges(self, connection: Connection) -> bool:
        """Whether rows name their exchange (revision outbox_0003 added the column).

        A relay of this release goes on publishing while the schema is older
        (docs/operations.md, ``/readyz``). Until the column exists it is looked
        for before every fetch, so rows are read with it from the first fetch
        after ``outbox migrate`` added it; once found, it is not looked for again.
        """
        if not self._row_exchanges:
            probe = _HAS_EXCHANGE_PG if self.is_postgresql else _HAS_EXCHANGE_SQLITE
            self._row_exchanges = bool(connection.execute(probe).scalar())
        return self._row_exchanges

    def event_columns(self, connection: Connection) -> tuple[Any, ...]:
        """The columns of an :class:`EventRow`, for the schema ``connection`` sees."""
        return _EVENT_COLUMNS if self.row_exchanges(connection) else _EVENT_COLUMNS_BEFORE_0003

    # -- plumbing -------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T]) -> T:
        with translated(), self.engine.begin() as connection:
            return work(connection)

    def _at(self, seconds: float = 0.0) -> Any:
        """The database's clock shifted by ``seconds`` (SQLite: this host's UTC clock)."""
        if self.is_postgresql:
            return func.now() + dt.timedelta(seconds=seconds) if seconds else func.now()
        # SQLite has no timestamp arithmetic; it stores naive UTC text.
        return dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=seconds)

    # -- relay: fetch and transitions -----------------------------------------

    def fetch_pending(
        self,
        partitions: Sequence[int],
        limit: int,
        exclude: Collection[int] = (),
        skip_keys: Collection[str] = (),
    ) -> list[EventRow]:
        """Pending rows of ``partitions`` in position order, skipping held keys.

        ``exclude`` names positions already published and awaiting their mark;
        they are skipped exactly (never by range), so that a row that committed
        late below them is still picked up in order. Rows of ``skip_keys`` are
        left for later.
        """
        if not partitions or limit <= 0:
            return []
        dead = E.alias("dead")
        query = (
            select(*_EVENT_COLUMNS)
            .where(
                E.c.state == table.PENDING,
                E.c.partition.in_(partitions),
                ~exists().where(
                    dead.c.state == table.DEAD,
                    dead.c.ordering_key == E.c.ordering_key,
                    dead.c.position < E.c.position,
                ),
            )
            .order_by(E.c.position)
            .limit(limit)
        )
        params: dict[str, Any] = {}
        if exclude:
            if self.is_postgresql:
                query = query.where(
                    E.c.position != sql_all(bindparam("exclude", type_=ARRAY(BigInteger())))
                )
                params["exclude"] = list(exclude)
            else:
                query = query.where(E.c.position.not_in(list(exclude)))
        if skip_keys:
            query = query.where(E.c.ordering_key.not_in(list(skip_keys)))

        def work(connection: Connection) -> list[EventRow]:
            columns = self.event_columns(connection)
            statement = query if columns is _EVENT_COLUMNS else query.with_only_columns(*columns)
            return [
                EventRow.from_mapping(row._mapping) for row in connection.execute(statement, params)
            ]

        return self._run(work)

    def mark_delivered(
        self,
        positions: Sequence[int],
        *,
        delete_rows: bool = False,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Record that the broker confirmed these rows. Returns how many changed.

        With ``event_ids``, a row changes only with both its position and its
        id (:meth:`outbox.store.protocol.Store.mark_delivered`).
        """
        if not positions:
            return 0
        if event_ids is None:
            chosen = E.c.position.in_(list(positions))
        else:
            # Pairwise, as tuples: (position, id) of one row, never one row's position
            # with another's id.
            pairs = [(p, uuid.UUID(i)) for p, i in zip(positions, event_ids, strict=True)]
            chosen = tuple_(E.c.position, E.c.event_id).in_(pairs)
        where = and_(chosen, E.c.state == table.PENDING)
        statement: Any
        if delete_rows:
            statement = delete(E).where(where)
        else:
            statement = (
                update(E)
                .where(where)
                .values(
                    state=table.DELIVERED,
                    delivered_at=self._at(),
                    attempts=E.c.attempts + 1,
                    last_error=None,
                )
            )
        return self._run(lambda c: c.execute(statement).rowcount)

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
        """Mark ``mark`` delivered, then fetch like :meth:`fetch_pending`, in one transaction.

        With ``owner``, rows are read only while ``owner`` holds every one of
        ``partitions`` by a lease unexpired on the database's clock, else none
        (:func:`outbox.store.fence.fetchable`): the fence against a relay that
        lost one. PostgreSQL does it all in one round trip (:mod:`outbox.store.pgfast`).
        """
        if not self.is_postgresql:
            self.mark_delivered(mark, delete_rows=delete_rows, event_ids=mark_ids)
            if owner is not None and partitions and limit > 0:
                partitions = fence.fetchable(partitions, self._held(owner))
            return self.fetch_pending(partitions, limit, exclude, skip_keys)

        def work(connection: Connection) -> list[EventRow]:
            raw = connection.connection.driver_connection
            assert raw is not None
            row_exchanges = self.row_exchanges(connection)
            try:
                _, rows = pgfast.mark_and_fetch(
                    raw,
                    row_class=EventRow,
                    mark=mark,
                    partitions=partitions,
                    limit=limit,
                    exclude=exclude,
                    owner=owner,
                    delete_rows=delete_rows,
                    prepare=self.prepared_statements,
                    skip_keys=list(skip_keys),
                    row_exchanges=row_exchanges,
                    mark_ids=mark_ids,
                )
            except psycopg.Error as exc:
                # Into SQLAlchemy's hierarchy, which outbox.store.driver_errors maps to ours.
                raise DBAPIError.instance(
                    pgfast.FETCH, None, exc, psycopg.Error, connection_invalidated=raw.broken
                ) from exc
            return rows

        return self._run(work)

    def _held(self, owner: str) -> list[int]:
        """The partitions ``owner`` holds right now (pgfast.HELD on PostgreSQL)."""
        query = select(P.c.partition).where(P.c.owner == owner, P.c.lease_expires_at > self._at())
        return self._run(lambda c: [r.partition for r in c.execute(query)])

    def mark_dead(self, position: int, reason: str) -> None:
        statement = (
            update(E)
            .where(E.c.position == position, E.c.state == table.PENDING)
            .values(state=table.DEAD, last_error=reason[:4000], attempts=E.c.attempts + 1)
        )
        self._run(lambda c: c.execute(statement))

    def record_failure(self, positions: Sequence[int], error: str) -> None:
        """Count a failed attempt on rows that stay pending."""
        if not positions:
            return
        statement = (
            update(E)
            .where(E.c.position.in_(list(positions)), E.c.state == table.PENDING)
            .values(attempts=E.c.attempts + 1, last_error=redact(error)[:4000])
        )
        self._run(lambda c: c.execute(statement))

    # -- leases ---------------------------------------------------------------

    def partition_count(self) -> int:
        return self._run(lambda c: c.execute(select(func.count()).select_from(P)).scalar_one())

    def rebalance(self, relay_id: str, ttl: float) -> Lease:
        """Renew, then release partitions above this relay's fair share or claim up to it.

        A relay joins by its first call (and again if others removed it as
        stale). Live relays are those whose heartbeat is younger than ``ttl``; a
        partition is free when unowned or its lease expired. Claiming bumps the
        partition's epoch, which fences out the previous owner.
        """
        expires = self._at(ttl)
        stale = self._at(-ttl)
        now = self._at()

        def work(connection: Connection) -> Lease:
            beat = update(R).where(R.c.relay_id == relay_id).values(heartbeat_at=now)
            if connection.execute(beat).rowcount == 0:
                # Another relay removed us as stale (we were stuck longer than
                # the TTL): come back as a new member.
                connection.execute(
                    insert(R).values(
                        relay_id=relay_id,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        started_at=now,
                        heartbeat_at=now,
                    )
                )
            connection.execute(delete(R).where(R.c.heartbeat_at < stale))
            live = connection.execute(select(func.count()).select_from(R)).scalar_one()
            total = connection.execute(select(func.count()).select_from(P)).scalar_one()
            share = math.ceil(total / max(live, 1))
            owned = {
                r.partition: r.epoch
                for r in connection.execute(
                    update(P)
                    .where(P.c.owner == relay_id)
                    .values(lease_expires_at=expires)
                    .returning(P.c.partition, P.c.epoch)
                )
            }
            if len(owned) > share:
                extra = sorted(owned)[share:]
                connection.execute(
                    update(P)
                    .where(P.c.partition.in_(extra), P.c.owner == relay_id)
                    .values(owner=None, lease_expires_at=None)
                )
                for p in extra:
                    del owned[p]
            elif len(owned) < share:
                free = (
                    select(P.c.partition)
                    .where(or_(P.c.owner.is_(None), P.c.lease_expires_at < now))
                    .order_by(P.c.partition)
                    .limit(share - len(owned))
                )
                if self.is_postgresql:
                    free = free.with_for_update(skip_locked=True)
                claimed = connection.execute(
                    update(P)
                    .where(P.c.partition.in_(free.scalar_subquery()))
                    .values(owner=relay_id, lease_expires_at=expires, epoch=P.c.epoch + 1)
                    .returning(P.c.partition, P.c.epoch)
                )
                owned.update({r.partition: r.epoch for r in claimed})
            return Lease(epochs=owned)

        return self._run(work)

    def release(self, relay_id: str) -> None:
        """Give up every partition at once (clean shutdown) so others need not wait."""

        def work(connection: Connection) -> None:
            connection.execute(
                update(P).where(P.c.owner == relay_id).values(owner=None, lease_expires_at=None)
            )
            connection.execute(delete(R).where(R.c.relay_id == relay_id))

        self._run(work)

    # -- status ---------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Rows per state and the age of the oldest pending row."""

        def work(connection: Connection) -> dict[str, Any]:
            by_state = dict.fromkeys(table.STATES, 0)
            for state, count in connection.execute(
                select(E.c.state, func.count()).group_by(E.c.state)
            ):
                by_state[state] = count
            oldest, now = connection.execute(
                select(
                    select(func.min(E.c.created_at))
                    .where(E.c.state == table.PENDING)
                    .scalar_subquery(),
                    # SQLite's "now" is a Python value: select() needs it as a literal.
                    self._at() if self.is_postgresql else literal(self._at(), DateTime()),
                )
            ).one()
            age = _age_seconds(oldest, now)
            held = connection.execute(
                select(func.count(func.distinct(E.c.ordering_key))).where(E.c.state == table.DEAD)
            ).scalar_one()
            return {**by_state, "oldest_pending_age_seconds": age, "held_keys": held}

        return self._run(work)

    def partitions(self) -> list[dict[str, Any]]:
        def work(connection: Connection) -> list[dict[str, Any]]:
            live = case((P.c.lease_expires_at > self._at(), P.c.owner), else_=None)
            rows = connection.execute(
                select(P.c.partition, live.label("owner"), P.c.epoch).order_by(P.c.partition)
            )
            return [dict(r._mapping) for r in rows]

        return self._run(work)

    # -- operations: metrics and retention ----------------------------

    def backlog(self) -> Backlog:
        """Pending and dead counts and the oldest pending creation time.

        Cheap on a large table: each part reads only a partial index (pending
        or dead rows), never the delivered ones.
        """

        def work(connection: Connection) -> Backlog:
            pending, oldest = connection.execute(
                select(func.count(), func.min(E.c.created_at)).where(E.c.state == table.PENDING)
            ).one()
            dead = connection.execute(
                select(func.count()).select_from(E).where(E.c.state == table.DEAD)
            ).scalar_one()
            if isinstance(oldest, str):  # SQLite returns CURRENT_TIMESTAMP text
                oldest = dt.datetime.fromisoformat(oldest)
            if oldest is not None and oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=dt.UTC)
            return Backlog(pending=pending, dead=dead, oldest_pending_created_at=oldest)

        return self._run(work)

    def purge_delivered(self, older_than_seconds: float, limit: int) -> int:
        """Delete up to ``limit`` rows delivered more than ``older_than_seconds`` ago.

        One short transaction per call; callers loop until it returns less than
        ``limit``, so no lock is ever held on many rows for long.
        """
        chosen = (
            select(E.c.position)
            .where(E.c.state == table.DELIVERED, E.c.delivered_at < self._at(-older_than_seconds))
            .order_by(E.c.delivered_at)
            .limit(limit)
        )
        if self.is_postgresql:
            chosen = chosen.with_for_update(skip_locked=True)
        statement = delete(E).where(
            E.c.position.in_(chosen.scalar_subquery()), E.c.state == table.DELIVERED
        )
        return self._run(lambda c: c.execute(statement).rowcount)


def _age_seconds(oldest: Any, now: Any) -> float | None:
    if oldest is None:
        return None
    if isinstance(oldest, str):  # SQLite returns CURRENT_TIMESTAMP text
        oldest = dt.datetime.fromisoformat(oldest)
    if isinstance(now, str):
        now = dt.datetime.fromisoformat(now)
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    age: float = (now - oldest).total_seconds()
    return max(0.0, round(age, 3))
