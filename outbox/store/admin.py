"""Operator SQL: inspect and resolve dead rows, select delivered events for replay.

Every change to a dead row is written to ``outbox_dead_audit`` (who, when,
why) in the same transaction as the change itself, so the trail cannot
disagree with the table.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, false, func, insert, select, text, update

from outbox.errors import OutboxError
from outbox.store import table
from outbox.store.rows import EventRow
from outbox.store.sqlstore import SqlStore

E = table.event
A = table.dead_letter_audit

RETRY = "retry"
SKIP = "skip"


# Rows per UPDATE ... IN (...): far below PostgreSQL's 65,535 bind parameters.
_CHUNK = 1000


class NotDead(OutboxError):
    """The event does not exist, or is not dead (someone resolved it already)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadSelection:
    """Which dead rows an operator means; every filter given must match (AND).

    ``every`` (``--all``) selects every dead row when no other filter is
    given; an empty selection selects nothing, so that no command changes
    every dead row by omission.
    """

    event_ids: Sequence[uuid.UUID] = ()
    keys: Sequence[str] = ()
    reason_contains: str | None = None  # a substring of last_error, case-insensitive
    every: bool = False

    @property
    def is_empty(self) -> bool:
        return not (self.event_ids or self.keys or self.reason_contains or self.every)

    @property
    def only_ids(self) -> bool:
        return bool(self.event_ids) and not (self.keys or self.reason_contains)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadRow:
    event_id: uuid.UUID
    position: int
    ordering_key: str
    routing_key: str
    created_at: dt.datetime
    attempts: int
    reason: str | None
    held_behind: int  # pending rows of the same key waiting for this one

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": str(self.event_id),
            "position": self.position,
            "key": self.ordering_key,
            "routing_key": self.routing_key,
            "created_at": self.created_at.isoformat(),
            "attempts": self.attempts,
            "reason": self.reason,
            "held_behind": self.held_behind,
        }


class AdminStore(SqlStore):
    """The store plus the queries only operators run (never on the relay's hot path)."""

    def dead_rows(
        self, limit: int | None = 1000, selection: DeadSelection | None = None
    ) -> list[DeadRow]:
        """Dead rows in position order, all of them or those ``selection`` names."""
        query = self._dead_query(selection).limit(limit)
        return self._run(lambda c: [DeadRow(**r._mapping) for r in c.execute(query)])

    def _dead_query(self, selection: DeadSelection | None) -> Select[Any]:
        behind = E.alias("behind")
        waiting = (
            select(func.count())
            .where(
                behind.c.ordering_key == E.c.ordering_key,
                behind.c.position > E.c.position,
                behind.c.state == table.PENDING,
            )
            .scalar_subquery()
        )
        query = (
            select(
                E.c.event_id,
                E.c.position,
                E.c.ordering_key,
                E.c.routing_key,
                E.c.created_at,
                E.c.attempts,
                E.c.last_error.label("reason"),
                waiting.label("held_behind"),
            )
            .where(E.c.state == table.DEAD)
            .order_by(E.c.position)
        )
        if selection is None:
            return query
        if selection.is_empty:
            return query.where(false())
        if selection.event_ids:
            query = query.where(E.c.event_id.in_(list(selection.event_ids)))
        if selection.keys:
            query = query.where(E.c.ordering_key.in_(list(selection.keys)))
        if selection.reason_contains:
            # lower() on both sides: ILIKE is PostgreSQL's, SQLite's LIKE folds ASCII only.
            query = query.where(
                func.lower(E.c.last_error).contains(
                    selection.reason_contains.lower(), autoescape=True
                )
            )
        return query

    def event_detail(self, event_id: uuid.UUID) -> dict[str, Any] | None:
        """Every column of one event, plus its audit trail; None if there is no such event."""

        def work(connection: Connection) -> dict[str, Any] | None:
            # Undelivered rows first, through their index; delivered ones are
            # found by a scan (operators mostly look at dead rows).
            row = (
                connection.execute(
                    select(E).where(E.c.event_id == event_id, E.c.state != table.DELIVERED)
                ).first()
                or connection.execute(select(E).where(E.c.event_id == event_id)).first()
            )
            if row is None:
                return None
            trail = connection.execute(
                select(A.c.operation, A.c.actor, A.c.reason, A.c.at)
                .where(A.c.event_id == event_id)
                .order_by(A.c.id)
            )
            return {**row._mapping, "audit": [dict(t._mapping) for t in trail]}

        return self._run(work)

    def resolve_dead(
        self,
        selection: DeadSelection | Sequence[uuid.UUID],
        operation: str,
        *,
        actor: str,
        reason: str,
        dry_run: bool = False,
    ) -> list[DeadRow]:
        """Retry (back to pending, same position) or skip dead rows, with an audit record.

        ``selection`` is a :class:`DeadSelection` or a list of event ids. A
        retried row keeps its position, so it is published before every later
        row of its key: the held key continues in order; several rows of one
        key change in one transaction, so the relay sees them all at once, in
        their positions. A skipped row stays in the table as 'skipped' and the
        key continues with the next row. All or nothing: if one event id given
        is not dead (or not matched by the other filters), nothing changes.

        Returns the rows changed, in position order; with ``dry_run`` the rows
        that would change, and nothing changes.
        """
        if not isinstance(selection, DeadSelection):
            selection = DeadSelection(event_ids=list(selection))
        state = {RETRY: table.PENDING, SKIP: table.SKIPPED}[operation]
        # Locked until commit: a concurrent `dead` command waits, then finds them resolved.
        query = self._dead_query(selection).with_for_update(of=E)

        def work(connection: Connection) -> list[DeadRow]:
            rows = [DeadRow(**r._mapping) for r in connection.execute(query)]
            found = {row.event_id for row in rows}
            missing = [event_id for event_id in selection.event_ids if event_id not in found]
            if missing:
                why = "" if selection.only_ids else ", or does not match the selection"
                raise NotDead(f"event {missing[0]} is not dead (no such event, or resolved{why})")
            if dry_run or not rows:
                return rows
            ids = [row.event_id for row in rows]
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                changed = connection.execute(
                    update(E)
                    .where(E.c.event_id.in_(chunk), E.c.state == table.DEAD)
                    .values(state=state)
                ).rowcount
                if changed != len(chunk):  # cannot happen under the row locks
                    raise NotDead("a selected row was resolved meanwhile; nothing changed")
            # In position order, so the trail reads in the order the rows will go out.
            connection.execute(
                insert(A).values(operation=operation, actor=actor, reason=reason, at=self._at()),
                [{"event_id": event_id} for event_id in ids],
            )
            if self.is_postgresql:
                # Wake idle relays at commit, as a producer would.
                connection.execute(
                    text("SELECT pg_notify(:channel, '')"), {"channel": table.NOTIFY_CHANNEL}
                )
            return rows

        return self._run(work)

    def delivered_for_replay(
        self,
        *,
        after_position: int,
        limit: int,
        since: dt.datetime | None = None,
        keys: Sequence[str] = (),
        event_ids: Sequence[uuid.UUID] = (),
    ) -> list[EventRow]:
        """Delivered rows matching every given filter, in position order, after a position."""

        def work(connection: Connection) -> list[EventRow]:
            query = select(*self.event_columns(connection)).where(
                E.c.position > after_position, *self._replay_filter(since, keys, event_ids)
            )
            query = query.order_by(E.c.position).limit(limit)
            return [EventRow.from_mapping(r._mapping) for r in connection.execute(query)]

        return self._run(work)

    def count_for_replay(
        self,
        *,
        since: dt.datetime | None = None,
        keys: Sequence[str] = (),
        event_ids: Sequence[uuid.UUID] = (),
    ) -> int:
        query = (
            select(func.count()).select_from(E).where(*self._replay_filter(since, keys, event_ids))
        )
        return self._run(lambda c: int(c.execute(query).scalar_one()))

    def _replay_filter(
        self,
        since: dt.datetime | None,
        keys: Sequence[str],
        event_ids: Sequence[uuid.UUID],
    ) -> list[Any]:
        conditions: list[Any] = [E.c.state == table.DELIVERED]
        if since is not None:
            # SQLite stores naive UTC text.
            moment = since if self.is_postgresql else since.astimezone(dt.UTC).replace(tzinfo=None)
            conditions.append(E.c.created_at >= moment)
        if keys:
            conditions.append(E.c.ordering_key.in_(list(keys)))
        if event_ids:
            conditions.append(E.c.event_id.in_(list(event_ids)))
        return conditions
