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

from sqlalchemy import Connection, func, insert, select, text, update

from outbox import table
from outbox.errors import OutboxError
from outbox.store import _EVENT_COLUMNS, EventRow, SqlStore

E = table.event
A = table.dead_letter_audit

RETRY = "retry"
SKIP = "skip"


class NotDead(OutboxError):
    """The event does not exist, or is not dead (someone resolved it already)."""


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

    def dead_rows(self, limit: int = 1000) -> list[DeadRow]:
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
            .limit(limit)
        )
        return self._run(lambda c: [DeadRow(**r._mapping) for r in c.execute(query)])

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
        self, event_ids: Sequence[uuid.UUID], operation: str, *, actor: str, reason: str
    ) -> None:
        """Retry (back to pending, same position) or skip dead rows, with an audit record.

        A retried row keeps its position, so it is published before every later
        row of its key: the held key continues in order. A skipped row stays in
        the table as 'skipped' and the key continues with the next row. All or
        nothing: if one id is not dead, nothing changes.
        """
        state = {RETRY: table.PENDING, SKIP: table.SKIPPED}[operation]
        values: dict[str, Any] = {"state": state}

        def work(connection: Connection) -> None:
            for event_id in event_ids:
                changed = connection.execute(
                    update(E)
                    .where(E.c.event_id == event_id, E.c.state == table.DEAD)
                    .values(**values)
                ).rowcount
                if changed != 1:
                    raise NotDead(f"event {event_id} is not dead (no such event, or resolved)")
                connection.execute(
                    insert(A).values(
                        event_id=event_id,
                        operation=operation,
                        actor=actor,
                        reason=reason,
                        at=self._at(),
                    )
                )
            if self.is_postgresql:
                # Wake idle relays at commit, as a producer would.
                connection.execute(text("SELECT pg_notify('outbox_event', '')"))

        self._run(work)

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
        query = select(*_EVENT_COLUMNS).where(
            E.c.position > after_position, *self._replay_filter(since, keys, event_ids)
        )
        query = query.order_by(E.c.position).limit(limit)
        return self._run(lambda c: [EventRow(**r._mapping) for r in c.execute(query)])

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
