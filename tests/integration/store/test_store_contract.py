"""The behaviour every :class:`~outbox.store.protocol.Store` must show, run against each backend.

Each test runs twice: on SQLite (SQLAlchemy Core throughout) and on PostgreSQL
(where ``mark_and_fetch`` takes the psycopg pipeline of ``outbox.store.pgfast``).
The store is driven only through the protocol the relay uses; what a test
observes besides its answers (a row's state, attempts, error; a lease's owner)
is read from the tables with SQLAlchemy Core, the same on both backends.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from sqlalchemy import Engine, Uuid, bindparam, select, text, update
from sqlalchemy.orm import Session

import outbox
from outbox.envelope import ordering
from outbox.store import table
from outbox.store.protocol import Store
from outbox.store.rows import EventRow
from outbox.store.sqlstore import SqlStore

SCHEMA = "https://example.org/schemas/case.json"
PARTITIONS = table.DEFAULT_PARTITIONS
ALL = list(range(PARTITIONS))
TTL = 60.0
# Long before any lease or heartbeat a test creates: "expired", on both clocks.
PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
E, P, R = table.event, table.partition, table.relay


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """A freshly migrated database with 16 partitions, on each backend in turn."""
    name = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    result: Engine = request.getfixturevalue(name)
    return result


@pytest.fixture
def store(engine: Engine) -> Store:
    return SqlStore(engine)


# -- writing rows ---------------------------------------------------------------


def key_in(partition: int, n: int = 0) -> str:
    """The ``n``-th ordering key (``case:1:<i>``) that hashes to ``partition``."""
    keys = (f"case:1:{i}" for i in range(100_000))
    matching = (k for k in keys if ordering.partition_of(k, PARTITIONS) == partition)
    for _ in range(n):
        next(matching)
    return next(matching)


def publish(engine: Engine, keys: Iterable[str]) -> list[int]:
    """One event per key, in one producer transaction; their positions, in that order."""
    with Session(engine) as session, session.begin():
        ids = [
            outbox.publish(
                session,
                outbox.Envelope(action="update", schema=SCHEMA, content={"n": i}),
                key=key,
            )
            for i, key in enumerate(keys)
        ]
    with engine.connect() as connection:
        by_id = dict(connection.execute(select(E.c.event_id, E.c.position)).all())
    return [by_id[i] for i in ids]


_RAW_INSERT = text(
    "INSERT INTO outbox_event (event_id, ordering_key, partition, routing_key,"
    " resource_type, payload, state)"
    " VALUES (:event_id, :ordering_key, :partition, 'case.update', 'case', :payload, :state)"
    " RETURNING position"
).bindparams(bindparam("event_id", type_=Uuid()))


def insert_raw(engine: Engine, key: str, state: str = table.PENDING) -> int:
    """A row as another writer stores it, bypassing ``publish``; its position."""
    with engine.begin() as connection:
        position: int = connection.execute(
            _RAW_INSERT,
            {
                "event_id": uuid.uuid4(),
                "ordering_key": key,
                "partition": ordering.partition_of(key, PARTITIONS),
                "payload": json.dumps({"action": "update", "resource": {"schema": SCHEMA}}),
                "state": state,
            },
        ).scalar_one()
    return position


# -- reading what the store did ---------------------------------------------------


def fetch(
    store: Store,
    partitions: Sequence[int] = ALL,
    limit: int = 100,
    exclude: Sequence[int] = (),
    **options: Any,
) -> list[int]:
    return [r.position for r in store.mark_and_fetch([], partitions, limit, exclude, **options)]


def row(engine: Engine, position: int) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(E.c.state, E.c.attempts, E.c.last_error, E.c.delivered_at).where(
                E.c.position == position
            )
        ).one_or_none()


def owners(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as connection:
        return dict(connection.execute(select(P.c.partition, P.c.owner)).all())


def expire(engine: Engine, partitions: Sequence[int] | None = None) -> None:
    """As if their owner had stalled: the leases of ``partitions`` (None: all) ran out."""
    statement = update(P).values(lease_expires_at=PAST)
    if partitions is not None:
        statement = statement.where(P.c.partition.in_(list(partitions)))
    with engine.begin() as connection:
        connection.execute(statement)


def stall(engine: Engine, relay_id: str) -> None:
    """``relay_id`` froze for longer than the TTL: heartbeat and leases expired."""
    with engine.begin() as connection:
        connection.execute(update(R).where(R.c.relay_id == relay_id).values(heartbeat_at=PAST))
        connection.execute(update(P).where(P.c.owner == relay_id).values(lease_expires_at=PAST))


# -- fetching -----------------------------------------------------------------------


def test_the_database_has_the_default_partitions(store: Store) -> None:
    assert store.partition_count() == PARTITIONS


def test_rows_come_in_position_order_overall_and_within_each_partition(
    engine: Engine, store: Store
) -> None:
    a, b, c = key_in(2), key_in(5), key_in(11)
    first = publish(engine, [c, a, b, a, c])
    second = publish(engine, [b, c, a])
    written = first + second
    assert written == sorted(written)

    rows = store.mark_and_fetch([], ALL, 100)
    assert [r.position for r in rows] == written
    for partition in (2, 5, 11):
        mine = [r.position for r in rows if r.partition == partition]
        assert len(mine) >= 2 and mine == sorted(mine)
    # The limit takes the lowest positions, not some of them.
    assert fetch(store, limit=3) == written[:3]
    # Only the partitions asked for.
    assert fetch(store, [5]) == [p for r, p in zip(rows, written, strict=True) if r.partition == 5]
    assert fetch(store, []) == []
    assert fetch(store, limit=0) == []


def test_rows_carry_what_was_written(engine: Engine, store: Store) -> None:
    key = key_in(3)
    (position,) = publish(engine, [key])
    (fetched,) = store.mark_and_fetch([], ALL, 10)
    assert isinstance(fetched, EventRow)
    assert fetched.position == position
    assert (fetched.ordering_key, fetched.partition) == (key, 3)
    assert (fetched.routing_key, fetched.resource_type) == ("case.update", "case")
    assert fetched.attempts == 0 and fetched.exchange is None
    # The id in its canonical text form, as it is sent: the same on every store.
    assert fetched.event_id == str(uuid.UUID(fetched.event_id))
    # PostgreSQL's fast path builds the row positionally: the same as by column name.
    assert isinstance(store, SqlStore)
    assert store.fetch_pending(ALL, 10) == [fetched]


def test_exclude_skips_exactly_those_positions(engine: Engine, store: Store) -> None:
    written = publish(engine, [key_in(1), key_in(1, 1), key_in(4), key_in(1)])
    # In flight: the second and third. Rows below and above them still come.
    assert fetch(store, exclude=written[1:3]) == [written[0], written[3]]
    assert fetch(store, exclude=written) == []


def test_skip_keys_leaves_those_keys_for_later(engine: Engine, store: Store) -> None:
    paused, other = key_in(6), key_in(6, 1)
    written = publish(engine, [paused, other, paused, other])
    assert fetch(store, skip_keys=[paused]) == [written[1], written[3]]
    assert fetch(store, skip_keys=[paused, other]) == []
    assert fetch(store) == written


def test_a_dead_row_holds_its_key(engine: Engine, store: Store) -> None:
    held, free = key_in(7), key_in(9)
    before, dead, after, later = publish(engine, [held, held, held, held])
    others = publish(engine, [free, free])
    store.mark_dead(dead, "invalid JSON")
    # The row before the dead one still goes; those after it wait; other keys do not.
    assert fetch(store) == [before, *others]
    store.mark_and_fetch([before], ALL, 100)
    assert fetch(store) == others
    assert row(engine, after).state == row(engine, later).state == table.PENDING


def test_a_row_written_dead_by_another_writer_holds_its_key(engine: Engine, store: Store) -> None:
    # Rows inserted with SQL, as a service that does not use publish() would.
    held, free = key_in(8), key_in(8, 1)
    first = insert_raw(engine, held)
    insert_raw(engine, held, state=table.DEAD)
    behind = insert_raw(engine, held)
    other = insert_raw(engine, free)
    published = publish(engine, [held, free])
    assert fetch(store) == [first, other, published[1]]
    assert behind not in fetch(store, [8], 100)


# -- transitions --------------------------------------------------------------------


def test_mark_delivered(engine: Engine, store: Store) -> None:
    one, two, three = publish(engine, [key_in(0), key_in(0), key_in(10)])
    assert store.mark_delivered([one, two]) == 2
    assert fetch(store) == [three]
    delivered = row(engine, one)
    assert delivered.state == table.DELIVERED
    assert delivered.attempts == 1 and delivered.delivered_at is not None
    # Only pending rows change: marking again, or marking a dead row, changes nothing.
    assert store.mark_delivered([one, two]) == 0
    store.mark_dead(three, "refused")
    assert store.mark_delivered([three]) == 0
    assert row(engine, three).state == table.DEAD
    assert store.mark_delivered([]) == 0


def test_mark_delivered_can_delete_the_rows(engine: Engine, store: Store) -> None:
    one, two = publish(engine, [key_in(12), key_in(13)])
    assert store.mark_delivered([one], delete_rows=True) == 1
    assert row(engine, one) is None
    assert row(engine, two).state == table.PENDING


@pytest.mark.parametrize("delete_rows", [False, True])
@pytest.mark.parametrize("way", ["mark_delivered", "mark_and_fetch"])
def test_a_mark_with_event_ids_changes_only_the_row_with_both(
    engine: Engine, store: Store, way: str, delete_rows: bool
) -> None:
    # After a failover to a standby that missed transactions, a position comes
    # back holding another event: the relay's mark must not touch it.
    one, two, three = publish(engine, [key_in(1, 5), key_in(2, 5), key_in(3, 5)])
    with engine.connect() as connection:
        ids = {p: str(i) for i, p in connection.execute(select(E.c.event_id, E.c.position))}
    positions = [one, two, three]
    given = [ids[one], str(uuid.uuid4()), ids[three]]  # two: another event's id
    if way == "mark_delivered":
        changed = store.mark_delivered(positions, event_ids=given, delete_rows=delete_rows)
        assert changed == 2
    else:
        assert [
            r.position
            for r in store.mark_and_fetch(
                positions, ALL, 10, delete_rows=delete_rows, mark_ids=given
            )
        ] == [two]
    assert row(engine, two).state == table.PENDING
    for marked in (one, three):
        found = row(engine, marked)
        assert found is None if delete_rows else found.state == table.DELIVERED


def test_mark_and_fetch_marks_first_then_fetches(engine: Engine, store: Store) -> None:
    written = publish(engine, [key_in(14), key_in(14), key_in(15), key_in(15)])
    assert fetch(store, limit=2) == written[:2]
    # The rows just marked are not returned, without being excluded.
    assert fetch(store) == written
    rows = store.mark_and_fetch(written[:2], ALL, 100)
    assert [r.position for r in rows] == written[2:]
    assert row(engine, written[0]).state == table.DELIVERED
    rows = store.mark_and_fetch(written[2:3], ALL, 100, delete_rows=True)
    assert [r.position for r in rows] == written[3:]
    assert row(engine, written[2]) is None
    # Marking alone (nothing to fetch) marks too.
    assert store.mark_and_fetch(written[3:], ALL, 0) == []
    assert row(engine, written[3]).state == table.DELIVERED


def test_mark_dead_records_the_reason(engine: Engine, store: Store) -> None:
    (position,) = publish(engine, [key_in(3)])
    store.mark_dead(position, "x" * 5000)
    dead = row(engine, position)
    assert dead.state == table.DEAD
    assert dead.attempts == 1
    assert dead.last_error == "x" * 4000
    assert fetch(store) == []


def test_record_failure_counts_attempts_and_keeps_the_row_pending(
    engine: Engine, store: Store
) -> None:
    failed, untouched = publish(engine, [key_in(4), key_in(4, 1)])
    store.record_failure([failed], "nacked: first")
    store.record_failure([failed], "unroutable: second")
    after = row(engine, failed)
    assert after.state == table.PENDING
    assert (after.attempts, after.last_error) == (2, "unroutable: second")
    assert row(engine, untouched).attempts == 0
    rows = store.mark_and_fetch([], ALL, 100)
    assert [(r.position, r.attempts) for r in rows] == [(failed, 2), (untouched, 0)]
    # A row no longer pending is not counted.
    store.mark_delivered([failed])
    store.record_failure([failed], "late")
    assert row(engine, failed).attempts == 3  # 2 failures + the delivery
    assert row(engine, failed).last_error is None


# -- partition leases -------------------------------------------------------------------


def test_rebalance_shares_the_partitions(engine: Engine, store: Store) -> None:
    alone = store.rebalance("a", TTL)
    assert alone.partitions == ALL
    # A newcomer finds no free partition until the holder gives up its surplus.
    assert store.rebalance("b", TTL).partitions == []
    a = store.rebalance("a", TTL)
    b = store.rebalance("b", TTL)
    assert len(a.partitions) == len(b.partitions) == PARTITIONS // 2
    assert sorted(a.partitions + b.partitions) == ALL
    # Renewal keeps a partition's epoch; a claim bumps it.
    assert all(a.epochs[p] == alone.epochs[p] for p in a.partitions)
    assert all(b.epochs[p] == alone.epochs[p] + 1 for p in b.partitions)
    assert owners(engine) == {p: "a" if p in a.epochs else "b" for p in ALL}
    # Stable once shared.
    assert store.rebalance("a", TTL) == a
    assert store.rebalance("b", TTL) == b


def test_release_frees_every_partition_at_once(engine: Engine, store: Store) -> None:
    store.rebalance("a", TTL)
    store.rebalance("b", TTL)
    store.rebalance("a", TTL)
    assert len(store.rebalance("b", TTL).partitions) == PARTITIONS // 2
    store.release("a")
    assert set(owners(engine).values()) == {None, "b"}
    with engine.connect() as connection:
        assert connection.execute(select(R.c.relay_id)).scalars().all() == ["b"]
    # No waiting for a's leases to expire: b alone now, it takes them all.
    assert store.rebalance("b", TTL).partitions == ALL


def test_takeover_after_the_ttl_bumps_the_epoch(engine: Engine, store: Store) -> None:
    held = store.rebalance("a", TTL)
    # While a's leases run, nobody takes them.
    assert store.rebalance("b", TTL).partitions == []
    store.release("b")
    stall(engine, "a")
    taken = store.rebalance("b", TTL)
    assert taken.partitions == ALL
    assert taken.epochs == {p: held.epochs[p] + 1 for p in ALL}
    # The stalled relay comes back as a new member with nothing, then gets its share anew.
    assert store.rebalance("a", TTL).partitions == []
    store.rebalance("b", TTL)
    back = store.rebalance("a", TTL)
    assert len(back.partitions) == PARTITIONS // 2
    assert back.epochs == {p: taken.epochs[p] + 1 for p in back.partitions}


# -- the fetch fence (outbox.store.fence) ------------------------------------------------


def one_key_per_partition(engine: Engine) -> dict[int, int]:
    positions = publish(engine, [key_in(p) for p in ALL])
    return dict(zip(ALL, positions, strict=True))


def test_the_fence_lets_the_owner_fetch_what_it_holds(engine: Engine, store: Store) -> None:
    rows = one_key_per_partition(engine)
    lease = store.rebalance("a", TTL)
    assert fetch(store, lease.partitions, owner="a") == sorted(rows.values())
    assert fetch(store, [3, 4], owner="a") == [rows[3], rows[4]]
    # Another relay holds none of them; unfenced (tools, tests) reads anything.
    assert fetch(store, [3], owner="b") == []
    assert fetch(store, [3]) == [rows[3]]


def test_a_relay_that_lost_one_partition_fetches_nothing_until_it_rebalances(
    engine: Engine, store: Store
) -> None:
    rows = one_key_per_partition(engine)
    stale = store.rebalance("a", TTL)
    assert stale.partitions == ALL
    # Partition 5's lease ran out (a missed renewals) and b claimed it.
    expire(engine, [5])
    assert store.rebalance("b", TTL).partitions == [5]

    # a's view of its lease is stale: not the 15 partitions it still holds, nothing.
    assert fetch(store, stale.partitions, owner="a") == []
    assert fetch(store, stale.partitions, owner="a", skip_keys=[key_in(5)]) == []
    # Marking is not fenced: the broker confirmed those rows to a.
    assert store.mark_and_fetch([rows[0]], stale.partitions, 100, owner="a") == []
    assert row(engine, rows[0]).state == table.DELIVERED
    # Its new owner reads partition 5.
    assert fetch(store, [5], owner="b") == [rows[5]]

    # The next rebalance tells a what it holds: it fetches exactly that.
    lease = store.rebalance("a", TTL)
    assert 5 not in lease.partitions and len(lease.partitions) == PARTITIONS // 2
    assert fetch(store, lease.partitions, owner="a") == sorted(
        rows[p] for p in lease.partitions if p != 0
    )
    # And b its share, including what a gave up.
    theirs = store.rebalance("b", TTL).partitions
    assert sorted(theirs + lease.partitions) == ALL
    assert fetch(store, theirs, owner="b") == sorted(rows[p] for p in theirs)


def test_a_relay_whose_lease_expired_fetches_nothing_until_it_renews(
    engine: Engine, store: Store
) -> None:
    rows = one_key_per_partition(engine)
    lease = store.rebalance("a", TTL)
    expire(engine, [15])  # nobody took it, but the lease ran out on the database's clock
    assert fetch(store, lease.partitions, owner="a") == []
    assert fetch(store, [15], owner="a") == []
    assert store.rebalance("a", TTL) == lease  # renewed, same epochs: nobody else had it
    assert fetch(store, lease.partitions, owner="a") == sorted(rows.values())
