"""The hooks on AsyncSession: asyncpg and psycopg on PostgreSQL, aiosqlite on SQLite."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, selectinload

import outbox
from outbox.errors import BulkChangeError
from tests.hooks_models import Base, Case, CaseNote, events, summary


async def exercise(url: str) -> None:
    """Create, change (field and child), delete a child and a case, from async sessions."""
    engine = create_async_engine(url)
    factory = outbox.instrument(async_sessionmaker(engine, expire_on_commit=False))
    plain = async_sessionmaker(engine)
    try:
        async with factory.begin() as session:
            session.add(Case(tenant_id=1, id=1, title="New", notes=[CaseNote(text="a")]))
            session.add(Case(tenant_id=1, id=2, title="Doomed"))
        async with factory.begin() as session:
            case = await session.get_one(Case, (1, 1), options=[selectinload(Case.notes)])
            case.title = "Changed"
            case.notes.append(CaseNote(text="b"))
        async with factory.begin() as session:
            # The note's parent is not loaded: the hooks load it inside the flush.
            note = (await session.scalars(select(CaseNote).where(CaseNote.text == "a"))).one()
            await session.delete(note)
        async with factory.begin() as session:
            await session.delete(await session.get_one(Case, (1, 2)))
        async with plain.begin() as session:  # another factory: no events
            session.add(Case(tenant_id=1, id=3, title="Plain"))
        async with factory() as session:
            with pytest.raises(BulkChangeError):
                await session.execute(update(Case).values(title="bulk"))
    finally:
        await engine.dispose()


def check(engine: Engine) -> None:
    assert summary(engine) == [
        ("case.create", "case:1:1"),
        ("case.create", "case:1:2"),
        ("case.update", "case:1:1"),
        ("case.update", "case:1:1"),
        ("case.delete", "case:1:2"),
    ]
    versions = [e["content"]["version"] for e in events(engine)]
    assert versions == [1, 1, 2, 3, 1]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_async_session_on_postgresql(pg_engine: Engine, driver: str) -> None:
    Base.metadata.create_all(pg_engine)
    url = pg_engine.url.set(drivername=f"postgresql+{driver}")
    asyncio.run(exercise(url.render_as_string(hide_password=False)))
    check(pg_engine)


def test_async_session_on_sqlite(sqlite_engine: Engine) -> None:
    Base.metadata.create_all(sqlite_engine)
    url = sqlite_engine.url.set(drivername="sqlite+aiosqlite")
    asyncio.run(exercise(url.render_as_string(hide_password=False)))
    check(sqlite_engine)


def test_instrumenting_an_async_factory_leaves_others_untouched() -> None:
    shared = async_sessionmaker()
    mine = outbox.instrument(async_sessionmaker())
    sync_class = mine.kw["sync_session_class"]
    assert issubclass(sync_class, Session) and sync_class is not Session
    assert "sync_session_class" not in shared.kw
    assert outbox.instrument(mine).kw["sync_session_class"] is sync_class  # idempotent

    scoped = outbox.instrument(async_scoped_session(async_sessionmaker(), asyncio.current_task))
    assert scoped.session_factory.kw["sync_session_class"] not in (Session, sync_class)
