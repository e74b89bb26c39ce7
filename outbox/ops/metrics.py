"""Prometheus metrics for a running relay, all named ``outbox_*``.

:class:`PrometheusObserver` turns the relay's hooks (:mod:`outbox.relay.observer`)
into counters and histograms as they happen. The gauges that describe the
table (backlog, oldest pending event, dead rows) are set from a reading of the
database by :func:`set_table_gauges`: at start by :func:`refresh_table_gauges`,
then by the scheduled backlog job (:class:`outbox.ops.operations.BacklogJob`),
whose reading also gives the ``backlog`` log line. Every relay replica reports
the same table-wide values, so aggregate them with ``max``, not ``sum``.

Metrics live in a registry of their own (never the process-global one), so an
application embedding the relay keeps its own metrics apart and tests can run
several relays in one process. That registry also carries prometheus_client's
process, platform and garbage-collector collectors (``process_*``,
``python_info``, ``python_gc_*``).

The exposition leaves out the ``*_created`` series that prometheus_client adds
to counters and histograms (each series' creation time: one more series for
every counter and histogram, stored and never graphed). They are filtered out
of this registry's scrape only: ``prometheus_client.disable_created_metrics()`` or its environment
variable would change them for every registry of the process, also those of
an application that embeds the relay.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from outbox.errors import OutboxError
from outbox.logs import emit
from outbox.relay.nodes import BrokerNodes
from outbox.relay.observer import RelayObserver
from outbox.relay.publisher import (
    CONNECTION,
    EXHAUSTED,
    NACKED,
    REFUSED,
    RETURNED,
    TIMEOUT,
    UNSENDABLE,
)
from outbox.store.rows import Backlog
from outbox.store.sqlstore import SqlStore

log = logging.getLogger(__name__)

PREFIX = "outbox"
# Why the relay marked a row dead (the ``cause`` label); RelayObserver.event_dead.
DEAD_CAUSES = ("invalid", RETURNED, UNSENDABLE, REFUSED, EXHAUSTED)
_BATCH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZES = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# From milliseconds (a relay keeping up) to an hour (a backlog after an outage).
_LAG_SECONDS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip


def package_version() -> str:
    try:
        return metadata.version("outbox")
    except metadata.PackageNotFoundError:
        return "unknown"


class PrometheusObserver(RelayObserver):
    """Relay hooks recorded as Prometheus metrics, plus a heartbeat for ``/livez``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            with contextlib.suppress(ValueError):  # a registry passed in may hold them already
                collector(registry=r)
        self.backlog = Gauge(
            f"{PREFIX}_backlog_events", "Pending rows in the outbox table.", registry=r
        )
        self.oldest_pending = Gauge(
            f"{PREFIX}_oldest_pending_created_timestamp_seconds",
            "Creation time (Unix seconds) of the oldest pending event; 0 when none is pending.",
            registry=r,
        )
        self.dead = Gauge(
            f"{PREFIX}_dead_events",
            "Rows marked dead; each holds its ordering key until retried or skipped.",
            registry=r,
        )
        self.table_refreshed = Gauge(
            f"{PREFIX}_table_gauges_refreshed_timestamp_seconds",
            "When the backlog, oldest-pending and dead gauges were last read from the database.",
            registry=r,
        )
        self.published = Counter(
            f"{PREFIX}_published_events",
            "Events the broker confirmed and the relay marked delivered.",
            registry=r,
        )
        self.publish_failures = Counter(
            f"{PREFIX}_publish_failures",
            "Messages not confirmed, by reason (nacked, unroutable, timeout, connection, "
            "refused, unsendable).",
            ["reason"],
            registry=r,
        )
        self.validation_failures = Counter(
            f"{PREFIX}_validation_failures",
            "Rows the relay marked dead because their envelope or content was invalid.",
            registry=r,
        )
        self.dead_marked = Counter(
            f"{PREFIX}_events_marked_dead",
            "Rows this relay marked dead, by cause (invalid, unroutable, unsendable, refused, "
            "exhausted).",
            ["cause"],
            registry=r,
        )
        self.batch_duration = Histogram(
            f"{PREFIX}_batch_duration_seconds",
            "Age of the oldest message in the window when a group of confirms arrives.",
            buckets=_BATCH_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size_events",
            "Events confirmed together (one read of the broker's confirms).",
            buckets=_BATCH_SIZES,
            registry=r,
        )
        self.delivery_lag = Histogram(
            f"{PREFIX}_delivery_lag_seconds",
            "Time from an event's created_at (the database's clock, in the producer's "
            "transaction) to the broker's confirm of its message (the relay's clock).",
            buckets=_LAG_SECONDS,
            registry=r,
        )
        self.broker_up = Gauge(
            f"{PREFIX}_broker_connected",
            "1 while the relay holds a broker connection, 0 after it failed.",
            registry=r,
        )
        self.broker_failures = Counter(
            f"{PREFIX}_broker_connection_failures",
            "Times the broker connection failed or could not be opened.",
            registry=r,
        )
        self.broker_node = Gauge(
            f"{PREFIX}_broker_node_connected",
            "1 for the broker node (host:port of the broker URL list) the relay is "
            "connected to, 0 for the others.",
            ["node"],
            registry=r,
        )
        self.broker_failovers = Counter(
            f"{PREFIX}_broker_failovers",
            "Connections opened on another broker node than the previous connection's.",
            registry=r,
        )
        self._broker_nodes: tuple[str, ...] = ()
        self.store_up = Gauge(
            f"{PREFIX}_database_available",
            "1 when the last database call succeeded, 0 when it failed for lack of a connection.",
            registry=r,
        )
        self.owned = Gauge(
            f"{PREFIX}_partitions_owned", "Partitions this relay publishes.", registry=r
        )
        self.standby = Gauge(
            f"{PREFIX}_partitions_standby",
            "Partitions owned by other relays, which this one takes over if they stop.",
            registry=r,
        )
        self.last_tick = Gauge(
            f"{PREFIX}_loop_last_tick_timestamp_seconds",
            "When the relay loop last went round (Unix seconds).",
            registry=r,
        )
        self.build = Info(f"{PREFIX}_build", "Version of the relay.", registry=r)
        self.build.info({"version": package_version(), "python": platform.python_version()})
        # Pre-create every reason so rate() sees a zero before the first failure.
        for reason in (NACKED, RETURNED, TIMEOUT, CONNECTION, REFUSED, UNSENDABLE):
            self.publish_failures.labels(reason=reason)
        for cause in DEAD_CAUSES:
            self.dead_marked.labels(cause=cause)
        self._lock = threading.Lock()
        self._last_sign_of_life = time.monotonic()

    # -- liveness ---------------------------------------------------------------

    def seconds_since_sign_of_life(self) -> float:
        """Seconds since the loop last ticked or reported a failure.

        Failures count: a relay retrying a broker or database outage is alive
        and doing its job; only a loop that stopped calling back is stuck.
        """
        with self._lock:
            return time.monotonic() - self._last_sign_of_life

    def _alive(self) -> None:
        with self._lock:
            self._last_sign_of_life = time.monotonic()

    # -- hooks ----------------------------------------------------------------

    def loop_ticked(self) -> None:
        self._alive()
        self.last_tick.set_to_current_time()

    def batch_published(self, count: int, seconds: float) -> None:
        self._alive()
        self.published.inc(count)
        self.batch_size.observe(count)
        self.batch_duration.observe(seconds)

    def events_confirmed(self, created_at: Sequence[dt.datetime]) -> None:
        now = time.time()
        observe = self.delivery_lag.observe
        for moment in created_at:
            # Clamped: a database clock ahead of this host's would give a negative lag.
            observe(max(0.0, now - moment.timestamp()))

    def publish_failed(self, kind: str, count: int) -> None:
        self._alive()
        self.publish_failures.labels(reason=kind).inc(count)

    def event_dead(self, ordering_key: str, reason: str) -> None:
        self._alive()
        self.dead_marked.labels(cause=reason).inc()
        if reason == "invalid":
            self.validation_failures.inc()

    def partitions_changed(self, owned: Sequence[int], total: int) -> None:
        self._alive()
        self.owned.set(len(owned))
        self.standby.set(max(0, total - len(owned)))

    def broker_connected(self, connected: bool) -> None:
        self._alive()
        self.broker_up.set(1 if connected else 0)
        if not connected:
            self.broker_failures.inc()

    def watch_broker_nodes(self, nodes: BrokerNodes) -> None:
        """Follow the publisher's broker nodes: which one is connected, and failovers."""
        self._broker_nodes = tuple(nodes.labels)
        for label in self._broker_nodes:
            self.broker_node.labels(node=label).set(0)
        nodes.watch(self._broker_node_changed)

    def _broker_node_changed(self, node: str | None, failover: bool) -> None:
        for label in self._broker_nodes:
            self.broker_node.labels(node=label).set(1 if label == node else 0)
        if failover:
            self.broker_failovers.inc()

    def store_available(self, available: bool) -> None:
        self._alive()
        self.store_up.set(1 if available else 0)

    # -- exposition -------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type, for ``/metrics``."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


class _WithoutCreated:
    """A registry's families without their ``*_created`` samples (see the module doc)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            if any(sample.name == created for sample in family.samples):
                family = copy.copy(family)  # a collector may hand out the same one again
                family.samples = [s for s in family.samples if s.name != created]
            yield family


def refresh_table_gauges(observer: PrometheusObserver, store: SqlStore) -> bool:
    """Read backlog, oldest pending and dead rows from the database; False if it failed."""
    try:
        backlog = store.backlog()
    except OutboxError as exc:
        table_gauges_unknown(exc)
        return False
    set_table_gauges(observer, backlog)
    return True


def table_gauges_unknown(exc: OutboxError) -> None:
    """Say that the table gauges keep their last values: the backlog could not be read."""
    emit(
        log,
        "metrics_refresh_failed",
        "cannot refresh table gauges: %s",
        exc,
        level=logging.WARNING,
    )


def set_table_gauges(observer: PrometheusObserver, backlog: Backlog) -> None:
    """The table gauges from one reading of the backlog."""
    observer.backlog.set(backlog.pending)
    observer.dead.set(backlog.dead)
    oldest = backlog.oldest_pending_created_at
    observer.oldest_pending.set(oldest.timestamp() if oldest is not None else 0)
    observer.table_refreshed.set_to_current_time()
