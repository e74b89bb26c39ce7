"""Assemble a running relay from resolved settings: engine, publisher, listener, jobs."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import threading
from pathlib import PurePath
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from outbox.cli.settings import require
from outbox.envelope import limits
from outbox.errors import OutboxError
from outbox.logs import emit
from outbox.ops.operations import start_operations
from outbox.ops.retention import retention_seconds
from outbox.relay.loop import Relay, RelaySettings, Wakeup
from outbox.relay.publisher import broker_tls, open_publisher
from outbox.schemas.registry import relay_hooks
from outbox.store.engine import create_outbox_engine, normalize_url
from outbox.store.session import relay_connect_args
from outbox.store.sqlstore import SqlStore

log = logging.getLogger(__name__)


def relay_settings(values: dict[str, Any]) -> RelaySettings:
    return RelaySettings(
        batch_size=values["batch_size"],
        poll_interval=values["poll_interval"],
        lease_ttl=values["lease_ttl"],
        confirm_timeout=values["confirm_timeout"],
        unroutable=values["unroutable"],
        source=ce_source(values),
        type_prefix=ce_type_prefix(values),
        max_payload_bytes=values.get("max_payload_bytes", limits.DEFAULT_MAX_PAYLOAD_BYTES),
        max_attempts=values.get("max_attempts", 0),
        # A retention of 0 deletes rows on delivery (issue 6; the demo keeps them).
        delete_on_delivery="retention" in values and retention_seconds(values) == 0,
    )


def ce_source(values: dict[str, Any]) -> str:
    """``ce-source``: the setting, or for ``auto`` a slash and the database's name."""
    source = str(values.get("source") or "auto")
    if source != "auto":
        return source
    url = normalize_url(values["database_url"]) if values.get("database_url") else None
    if url is None or not url.database:
        return "/outbox"
    # SQLite names a file: its stem ("/srv/app/cases.db" -> "cases").
    name = PurePath(url.database).stem if url.get_backend_name() == "sqlite" else url.database
    return "/" + name


def ce_type_prefix(values: dict[str, Any]) -> str | None:
    """The start of ``ce-type``; None (``auto``) derives it from each event's schema URI."""
    prefix = str(values.get("type_prefix") or "auto")
    return {"auto": None, "none": ""}.get(prefix, prefix)


def build_relay(values: dict[str, Any], wakeup: Wakeup | None = None) -> Relay:
    for name in ("database_url", "broker_url"):
        require(values, name)
    # The broker URL first: it needs no I/O, and a refused transport then
    # leaves no database connection behind.
    publisher = open_publisher(values["broker_url"], values["exchange"], ssl=broker_tls(values))
    prepared = values.get("prepared_statements", True)
    url = normalize_url(values["database_url"])
    # Bounded lock waits and idle transactions, keepalives (outbox.store.session).
    connect_args = relay_connect_args(url, values["lease_ttl"])
    if not prepared:
        # psycopg also prepares any query it sees 5 times; off means never.
        connect_args["prepare_threshold"] = None
    extra: dict[str, Any] = {"connect_args": connect_args} if connect_args else {}
    engine = create_outbox_engine(url, pool_size=2, max_overflow=2, **extra)
    try:
        store = SqlStore(engine)
        store.prepared_statements = prepared
        store.partition_count()  # fails fast, with a clear message, when unmigrated or unreachable
        hooks = relay_hooks(
            engine,
            validate=values.get("validate_content", True),
            strict=values.get("strict_schemas", False),
            body_format=values.get("body_format", "json"),
        )
        return Relay(store, publisher, relay_settings(values), wakeup=wakeup, **hooks)
    except BaseException:
        engine.dispose()
        raise


def run_relay(values: dict[str, Any], stop: threading.Event) -> None:
    wakeup = Wakeup()
    relay = build_relay(values, wakeup)
    listener = None
    url = normalize_url(values["database_url"])
    if values["listen"] and url.get_backend_name() == "postgresql":
        from outbox.relay.listener import NotifyListener

        listener = NotifyListener(
            url, wakeup, connect_args=relay_connect_args(url, values["lease_ttl"])
        )
        listener.start()
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(
        _report_backlog, "interval", args=[relay], seconds=30, id="backlog", coalesce=True
    )
    operations = start_operations(values, relay, scheduler)
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
        relay.store.engine.dispose()


def _report_backlog(relay: Relay) -> None:
    # backlog() reads only the partial indexes of pending and dead rows; a
    # count by state would scan every delivered row each time.
    try:
        backlog = relay.store.backlog()
    except OutboxError as exc:
        emit(log, "backlog_unknown", "cannot read the backlog: %s", exc, level=logging.WARNING)
        return
    oldest = backlog.oldest_pending_created_at
    age = None if oldest is None else round((dt.datetime.now(dt.UTC) - oldest).total_seconds(), 3)
    # No pending row, no oldest one: the field says null, the message says nothing.
    oldest_text = "" if age is None else f", oldest pending {age:.1f}s ago"
    emit(
        log,
        "backlog",
        "pending %d, dead %d%s",
        backlog.pending,
        backlog.dead,
        oldest_text,
        pending=backlog.pending,
        dead=backlog.dead,
        oldest_pending_age_seconds=age,
    )
