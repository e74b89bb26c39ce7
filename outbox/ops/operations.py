"""What a long-running relay adds for its operators: metrics, probes, retention.

:func:`start_operations` adds a :class:`~outbox.ops.metrics.PrometheusObserver`
to the relay's observers, starts the HTTP server when ``http_port`` is set,
and schedules two jobs on the runner's scheduler: the backlog reading
(:class:`BacklogJob`: one read of the table per ``metrics_interval`` for both
the table gauges and the ``backlog`` log line) and the retention purge.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from apscheduler.schedulers.base import BaseScheduler

from outbox.errors import OutboxError, PublishError
from outbox.logs import emit
from outbox.ops import health, retention
from outbox.ops.http import HealthServer
from outbox.ops.metrics import (
    PrometheusObserver,
    refresh_table_gauges,
    set_table_gauges,
    table_gauges_unknown,
)
from outbox.relay.loop import Relay
from outbox.relay.nodes import BrokerNodes
from outbox.store.rows import Backlog
from outbox.store.sqlstore import SqlStore

log = logging.getLogger(__name__)

PURGE_INTERVAL = 60.0
BACKLOG_LOG_INTERVAL = 30.0  # seconds between two `backlog` log lines


@dataclass(frozen=True, kw_only=True)
class OperationsSettings:
    """What :func:`start_operations` needs: the ``http_*``, ``metrics_interval`` and
    ``retention`` settings, parsed (the CLI builds it in :mod:`outbox.cli.settings`)."""

    http_host: str = "0.0.0.0"
    http_port: int = 0  # 0: no HTTP server
    metrics_interval: float = 15.0  # seconds between two reads of the table backlog
    retention: float = 7 * 86400.0  # seconds delivered rows are kept; 0: deleted on delivery


@dataclass
class Operations:
    observer: PrometheusObserver
    server: HealthServer | None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def max_silence(relay: Relay) -> float:
    """How long the loop may go without a sign of life before /livez fails.

    The longest legitimate pause is a confirm timeout plus the longest retry
    back-off, plus an idle poll; twice that, and never under a minute.
    """
    s = relay.settings
    return max(60.0, 2 * (s.confirm_timeout + s.backoff_max + s.poll_interval + s.lease_ttl / 5))


def sql_store(relay: Relay) -> SqlStore:
    """The relay's store as operations read it: metrics, retention and probes need its SQL.

    The relay itself needs only a :class:`~outbox.store.protocol.Store`; the
    composition root (``outbox.cli.runner``) gives it an :class:`SqlStore`.
    """
    store = relay.store
    if not isinstance(store, SqlStore):
        raise TypeError(f"operations need the relay's store to be an SqlStore, not {store!r}")
    return store


class BacklogJob:
    """The scheduled reading of the table backlog: one query per run, for two consumers.

    Every run sets the table gauges (backlog, oldest pending, dead) from its
    reading; every ``log_every``-th run also logs that reading as the
    ``backlog`` line, so that the line comes every :data:`BACKLOG_LOG_INTERVAL`
    seconds (every run, when runs are further apart than that).
    """

    def __init__(self, store: SqlStore, observer: PrometheusObserver, *, interval: float) -> None:
        self.store = store
        self.observer = observer
        self.log_every = max(1, round(BACKLOG_LOG_INTERVAL / interval))
        self.runs = 0

    def __call__(self) -> None:
        self.runs += 1
        log_due = self.runs % self.log_every == 0
        # backlog() reads only the partial indexes of pending and dead rows; a
        # count by state would scan every delivered row each time.
        try:
            backlog = self.store.backlog()
        except OutboxError as exc:
            table_gauges_unknown(exc)
            if log_due:
                emit(
                    log,
                    "backlog_unknown",
                    "cannot read the backlog: %s",
                    exc,
                    level=logging.WARNING,
                )
            return
        set_table_gauges(self.observer, backlog)
        if log_due:
            log_backlog(backlog)


def log_backlog(backlog: Backlog) -> None:
    """The ``backlog`` log line: pending and dead rows, the age of the oldest pending one."""
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


def start_operations(
    settings: OperationsSettings, relay: Relay, scheduler: BaseScheduler
) -> Operations:
    observer = PrometheusObserver()
    relay.add_observer(observer)
    # The broker node metrics come from the publisher, which alone knows the
    # nodes; the relay loop only sees a connection come and go.
    nodes = getattr(relay.publisher, "nodes", None)
    if isinstance(nodes, BrokerNodes):
        observer.watch_broker_nodes(nodes)
    store = sql_store(relay)
    refresh_table_gauges(observer, store)
    # Connect now rather than at the first batch, so that an idle relay reports
    # a truthful outbox_broker_connected (a failure here is retried by the loop).
    try:
        relay.publisher.connect()
        observer.broker_connected(True)
    except PublishError:
        observer.broker_connected(False)
    # One reading of the backlog per interval feeds the gauges and the log line.
    scheduler.add_job(
        BacklogJob(store, observer, interval=settings.metrics_interval),
        "interval",
        seconds=settings.metrics_interval,
        id="table_gauges",
        coalesce=True,
        max_instances=1,
    )
    # With a retention of 0 rows are deleted on delivery; the job still clears
    # rows delivered before the setting changed.
    scheduler.add_job(
        retention.purge_delivered,
        "interval",
        args=[store, settings.retention],
        seconds=PURGE_INTERVAL,
        id="retention",
        coalesce=True,
        max_instances=1,
    )
    server = None
    if settings.http_port:
        server = HealthServer(
            host=settings.http_host or "0.0.0.0",
            port=settings.http_port,
            liveness=health.liveness(observer, max_silence(relay)),
            readiness=health.readiness(store.engine),
            metrics=observer.exposition,
        )
        server.start()
    return Operations(observer=observer, server=server)
