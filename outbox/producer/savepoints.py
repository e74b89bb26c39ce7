"""What a session recorded in its transaction, taken back with a rolled-back SAVEPOINT.

The publish buffer (:mod:`outbox.producer.publish`) and the session hooks'
record of touched resources (:mod:`outbox.producer.hooks`) both keep entries
made during a transaction. A SAVEPOINT that rolls back must take back the
entries made inside it and leave the others. :class:`SavepointLog` keeps the
entries in order with a mark per SAVEPOINT; :func:`track` keeps a session's
log in step with its transactions: a log lives in ``session.info`` for one root
transaction.

Each entry has a sequence number; each SAVEPOINT, a unique token and the
sequence number at which it began. Rolling it back drops the entries added
inside it, taken for writing or not (the database undoes the written ones).
Entries written while it was open but added before it began (a
``flush_events``, or the release of an inner SAVEPOINT, writes every pending
entry) are undone by the database too, yet belong to the enclosing
transaction: they become pending again, in their original order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

T = TypeVar("T")
L = TypeVar("L", bound="SavepointLog[Any]")


class SavepointLog(Generic[T]):
    """Entries added in a session's transaction, with a mark per SAVEPOINT."""

    def __init__(self) -> None:
        # (sequence number, entry), in the order of adding.
        self.pending: list[tuple[int, T]] = []
        # Entries taken for writing while a SAVEPOINT was open, with the tokens of all open ones.
        self.written: list[tuple[int, T, frozenset[int]]] = []
        self._next_seq = 0
        self._next_token = 0
        # id(SessionTransaction) -> (token, first sequence number inside it)
        self._savepoints: dict[int, tuple[int, int]] = {}

    def add(self, entry: T) -> None:
        self.pending.append((self._next_seq, entry))
        self._next_seq += 1

    def take(self) -> list[tuple[int, T]]:
        """Remove and return the pending entries; no SAVEPOINT takes them back any more."""
        taken, self.pending = self.pending, []
        return taken

    def put_back(self, taken: list[tuple[int, T]]) -> None:
        """Return what :meth:`take` gave, before the entries added since."""
        self.pending[:0] = taken

    def take_for_writing(self, session: Session) -> list[T]:
        """Remove and return the pending entries, to be written now in ``session``.

        They are remembered with the SAVEPOINTs open now: rolling one of those
        back undoes the write, and what was added before it began is pending again.
        """
        if not self.pending:
            return []
        open_tokens = self._open_tokens(session)
        if open_tokens:
            self.written.extend((seq, entry, open_tokens) for seq, entry in self.pending)
        return [entry for _, entry in self.take()]

    def _open_tokens(self, session: Session) -> frozenset[int]:
        tokens: set[int] = set()
        current: SessionTransaction | None = session.get_nested_transaction()
        while current is not None and current.nested:
            mark = self._savepoints.get(id(current))
            if mark is not None:
                tokens.add(mark[0])
            current = current.parent
        return frozenset(tokens)

    def adopt_open_savepoints(self, session: Session) -> None:
        """Mark the SAVEPOINTs open now as begun before every entry (a log made inside them)."""
        current: SessionTransaction | None = session.get_nested_transaction()
        while current is not None and current.nested:
            self.savepoint_started(current, start=0)
            current = current.parent

    def savepoint_started(
        self, transaction: SessionTransaction, *, start: int | None = None
    ) -> None:
        # A new SAVEPOINT that reuses the id of an ended one replaces its stale mark.
        seq = self._next_seq if start is None else start
        self._savepoints[id(transaction)] = (self._next_token, seq)
        self._next_token += 1

    def savepoint_rolled_back(self, transaction: SessionTransaction) -> None:
        mark = self._savepoints.pop(id(transaction), None)
        if mark is None:
            return
        token, start = mark
        undone = [(seq, entry) for seq, entry, tokens in self.written if token in tokens]
        self.written = [w for w in self.written if token not in w[2]]
        kept = [(seq, entry) for seq, entry in self.pending if seq < start]
        kept += [(seq, entry) for seq, entry in undone if seq < start]
        self.pending = sorted(kept, key=lambda item: item[0])


def log_for(session: Session, key: str, new: type[L]) -> L:
    """The log of ``session``'s transaction kept under ``key``, made by ``new`` if none is."""
    log = session.info.get(key)
    if log is None:
        log = session.info[key] = new()
        log.adopt_open_savepoints(session)
    assert isinstance(log, new)
    return log


def track(target: Session | type[Session], key: str, new: type[SavepointLog[Any]]) -> None:
    """Keep the log under ``session.info[key]`` in step with the transactions of ``target``.

    A SAVEPOINT that begins is marked (making the log with ``new`` if there is
    none yet); one that rolls back takes back its entries; the end of the root
    transaction drops the log, entries and marks alike. A SAVEPOINT's mark is
    kept when it ends: SQLAlchemy ends a nested transaction *before* it reports
    its rollback (``after_soft_rollback``); tokens are unique, so a stale mark
    never matches a later SAVEPOINT.
    """

    def after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            log_for(session, key, new).savepoint_started(transaction)

    def after_soft_rollback(session: Session, transaction: SessionTransaction) -> None:
        log = session.info.get(key)
        if transaction.nested and isinstance(log, SavepointLog):
            log.savepoint_rolled_back(transaction)

    def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            session.info.pop(key, None)

    listeners: tuple[tuple[str, Callable[[Session, SessionTransaction], None]], ...] = (
        ("after_transaction_create", after_transaction_create),
        ("after_soft_rollback", after_soft_rollback),
        ("after_transaction_end", after_transaction_end),
    )
    for name, listener in listeners:
        event.listen(target, name, listener)
