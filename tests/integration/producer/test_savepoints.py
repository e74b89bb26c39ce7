"""The one SAVEPOINT tracker (outbox.producer.savepoints) that both the publish buffer and
the session hooks use: entries of a rolled-back SAVEPOINT go, all others stay, on
PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, event, select
from sqlalchemy.orm import Session

from outbox.producer.savepoints import SavepointLog, log_for, track

KEY = "test.savepoints"
notes = Table("sp_note", MetaData(), Column("n", Integer(), nullable=False))


class Words(SavepointLog[str]):
    pass


class Numbers(SavepointLog[int]):
    pass


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    fixture = "pg_engine" if request.param == "postgresql" else "sqlite_engine"
    result: Engine = request.getfixturevalue(fixture)
    notes.create(result)
    yield result
    notes.drop(result)


def tracked(engine: Engine, log: type[SavepointLog[Any]] = Words) -> Session:
    session = Session(engine)
    track(session, KEY, log)
    return session


def entries(session: Session) -> list[str]:
    return [entry for _, entry in log_for(session, KEY, Words).pending]


def add(session: Session, entry: str) -> None:
    log_for(session, KEY, Words).add(entry)


def test_a_rolled_back_inner_savepoint_takes_back_its_entries_only(engine: Engine) -> None:
    with tracked(engine) as session, session.begin():
        add(session, "root")
        outer = session.begin_nested()
        add(session, "outer")
        inner = session.begin_nested()
        add(session, "inner")
        inner.rollback()
        assert entries(session) == ["root", "outer"]
        add(session, "outer again")
        outer.commit()
        assert entries(session) == ["root", "outer", "outer again"]


def test_a_released_inner_savepoint_goes_with_its_outer_one(engine: Engine) -> None:
    with tracked(engine) as session, session.begin():
        add(session, "root")
        outer = session.begin_nested()
        add(session, "outer")
        with session.begin_nested():
            add(session, "inner")
        assert entries(session) == ["root", "outer", "inner"]
        outer.rollback()
        assert entries(session) == ["root"]
        with session.begin_nested():  # a later SAVEPOINT starts with a mark of its own
            add(session, "later")
        assert entries(session) == ["root", "later"]


def test_the_log_ends_with_the_root_transaction(engine: Engine) -> None:
    with tracked(engine) as session:
        with session.begin():
            add(session, "first")
            session.begin_nested()
        assert KEY not in session.info  # committed: entries and marks are gone
        with session.begin():
            assert entries(session) == []
            session.rollback()
        assert KEY not in session.info


def test_a_log_made_inside_savepoints_belongs_to_them(engine: Engine) -> None:
    with tracked(engine) as session, session.begin():
        outer = session.begin_nested()
        session.begin_nested()
        session.info.pop(KEY)  # as if nothing had been tracked before: publish's first event
        add(session, "inside")
        outer.rollback()
        assert entries(session) == []


def written(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(select(notes.c.n).order_by(notes.c.n)).scalars())


def test_entries_written_inside_a_rolled_back_savepoint_are_pending_again(
    engine: Engine,
) -> None:
    """Entries taken for writing while SAVEPOINTs were open: the database undoes the
    write with the SAVEPOINT, and those added before it began must be written again."""

    def write(session: Session) -> None:
        values = log_for(session, KEY, Numbers).take_for_writing(session)
        if values:
            session.connection().execute(notes.insert(), [{"n": n} for n in values])

    with tracked(engine, Numbers) as session:
        event.listen(session, "before_commit", write)  # at every release and at the commit
        with session.begin():
            log = log_for(session, KEY, Numbers)
            log.add(1)
            outer = session.begin_nested()
            log.add(2)
            with session.begin_nested():
                log.add(3)
            # The inner release wrote 1, 2 and 3 inside the outer SAVEPOINT.
            assert log.pending == []
            outer.rollback()
            assert [n for _, n in log.pending] == [1]  # 2 and 3 went with the SAVEPOINT
            log.add(4)
            inner = session.begin_nested()
            log.add(5)
            write(session)  # 1, 4 and 5, inside the inner SAVEPOINT
            inner.rollback()
            assert [n for _, n in log.pending] == [1, 4]

    assert written(engine) == [1, 4]
