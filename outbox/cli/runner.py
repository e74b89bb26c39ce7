"""Assemble a running relay from its settings: engine, publisher, listener, jobs."""

from __future__ import annotations

import gc
import threading
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from outbox.cli.settings import Settings, require
from outbox.ops.operations import sql_store, start_operations
from outbox.relay.loop import Relay, Wakeup
from outbox.relay.publisher import open_publisher
from outbox.schemas.registry import relay_hooks
from outbox.store.engine import create_outbox_engine, normalize_url
from outbox.store.session import relay_connect_args
from outbox.store.sqlstore import SqlStore


def build_relay(settings: Settings, wakeup: Wakeup | None = None) -> Relay:
    database_url = require(settings.database.url, "database_url")
    broker = settings.broker
    broker_url = require(broker.url, "broker_url")
    # The broker URL first: it needs no I/O, and a refused transport then
    # leaves no database connection behind.
    publisher = open_publisher(broker_url, broker.exchange, ssl=broker.tls())
    prepared = settings.database.prepared_statements
    url = normalize_url(database_url)
    # Bounded lock waits and idle transactions, keepalives (outbox.store.session).
    connect_args = relay_connect_args(url, settings.relay.lease_ttl)
    if not prepared:
        # psycopg also prepares any query it sees 5 times; off means never.
        connect_args["prepare_threshold"] = None
    extra: dict[str, Any] = {"connect_args": connect_args} if connect_args else {}
    # No ping before each checkout: it is a round trip on every fetch and mark
    # (an event's latency, at a low rate). A connection that died meanwhile
    # fails its first statement instead; the relay backs off once (backoff_initial)
    # and SQLAlchemy replaces every pooled connection of the dead server.
    engine = create_outbox_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=False, **extra)
    try:
        store = SqlStore(engine)
        store.prepared_statements = prepared
        store.partition_count()  # fails fast, with a clear message, when unmigrated or unreachable
        hooks = relay_hooks(
            engine,
            validate=settings.schemas.validate_content,
            strict=settings.schemas.strict,
            body_format=settings.schemas.body_format,
        )
        return Relay(store, publisher, settings.relay, wakeup=wakeup, **hooks)
    except BaseException:
        engine.dispose()
        raise


def run_relay(settings: Settings, stop: threading.Event) -> None:
    wakeup = Wakeup()
    relay = build_relay(settings, wakeup)
    listener = None
    url = normalize_url(require(settings.database.url, "database_url"))
    if settings.database.listen and url.get_backend_name() == "postgresql":
        from outbox.relay.listener import NotifyListener

        listener = NotifyListener(
            url, wakeup, connect_args=relay_connect_args(url, settings.relay.lease_ttl)
        )
        listener.start()
    scheduler = BackgroundScheduler(daemon=True)
    # The metrics, the probes, and the jobs that read the backlog and purge old rows.
    operations = start_operations(settings.operations, relay, scheduler)
    scheduler.start()

    # A stop request must also interrupt an idle wait.
    def wake_on_stop() -> None:
        stop.wait()
        wakeup.set()

    waker = threading.Thread(target=wake_on_stop, daemon=True)
    waker.start()
    # Everything built so far (modules, engine, schemas) lives as long as the
    # process: keep it out of the collector's full passes, which otherwise
    # walk it all and pause the relay for milliseconds (tail latency).
    gc.freeze()
    try:
        relay.run(stop)
    finally:
        scheduler.shutdown(wait=False)
        operations.stop()
        if listener is not None:
            listener.stop()
        sql_store(relay).engine.dispose()
