from __future__ import annotations

import datetime as dt

import kombu
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, func, select, update

from outbox.ops.operations import start_operations
from outbox.ops.retention import purge_delivered
from outbox.relay.loop import Relay
from outbox.relay.publisher import open_publisher
from outbox.store import table
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url
from tests.ops_support import insert_invalid_row, publish_events, relay_values, versions_of

E = table.event


def states(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(select(E.c.state, func.count()).group_by(E.c.state))
        return {state: count for state, count in rows}


def test_purge_deletes_only_rows_delivered_before_the_retention(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    ids = publish_events(pg_engine, 7, range(1, 6))
    insert_invalid_row(pg_engine, "case:1:9")
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    assert relay.drain(timeout=30) == 5
    publish_events(pg_engine, 8, range(1, 3))  # still pending
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    with pg_engine.begin() as connection:
        connection.execute(update(E).where(E.c.event_id.in_(ids[:3])).values(delivered_at=old))
        # A dead and a pending row as old as the purged ones: never purged.
        connection.execute(update(E).where(E.c.state != "delivered").values(created_at=old))
    assert purge_delivered(SqlStore(pg_engine), 86400, batch=2) == 3
    assert states(pg_engine) == {"delivered": 2, "pending": 2, "dead": 1}
    with pg_engine.connect() as connection:
        left = connection.execute(select(E.c.event_id).where(E.c.state == "delivered"))
        assert {r.event_id for r in left} == set(ids[3:])
    assert purge_delivered(SqlStore(pg_engine), 86400, batch=2) == 0


def test_zero_retention_deletes_rows_on_delivery(
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    values = relay_values(
        database_url=pg_url(pg_database),
        broker_url=amqp_url,
        exchange=exchange_name,
        retention="0",
    )
    settings = values.relay
    assert settings.delete_on_delivery
    publish_events(pg_engine, 7, range(1, 4))
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name), settings)
    assert relay.drain(timeout=30) == 3
    assert versions_of(drain_queue(amqp_url, bound_queue, expected=3)) == [1, 2, 3]
    assert states(pg_engine) == {}


def test_retention_setting_and_scheduled_jobs(pg_database: str, pg_engine: Engine) -> None:
    assert relay_values().operations.retention == 7 * 86400  # the default, 7d
    assert relay_values(retention="12h").operations.retention == 43200
    assert not relay_values().relay.delete_on_delivery
    values = relay_values(database_url=pg_url(pg_database), broker_url="amqp://127.0.0.1:1//")
    assert values.broker.url is not None
    relay = Relay(SqlStore(pg_engine), open_publisher(values.broker.url, "x"))
    scheduler = BackgroundScheduler()
    operations = start_operations(values.operations, relay, scheduler)
    assert {job.id for job in scheduler.get_jobs()} == {"table_gauges", "retention"}
    assert operations.server is None  # no --http-port
