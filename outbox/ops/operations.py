"""What a long-running relay adds for its operators: metrics, probes, retention.

:func:`start_operations` attaches a :class:`~outbox.ops.metrics.PrometheusObserver`
to the relay, starts the HTTP server when ``http_port`` is set, and schedules
the table-gauge refresh and the retention purge on the runner's scheduler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.base import BaseScheduler

from outbox.errors import PublishError
from outbox.ops import health, retention
from outbox.ops.http import HealthServer
from outbox.ops.metrics import PrometheusObserver, refresh_table_gauges
from outbox.relay.loop import Relay

log = logging.getLogger(__name__)

PURGE_INTERVAL = 60.0


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


def start_operations(values: dict[str, Any], relay: Relay, scheduler: BaseScheduler) -> Operations:
    observer = PrometheusObserver()
    relay.observer = observer
    refresh_table_gauges(observer, relay.store)
    # Connect now rather than at the first batch, so that an idle relay reports
    # a truthful outbox_broker_connected (a failure here is retried by the loop).
    try:
        relay.publisher.connect()
        observer.broker_connected(True)
    except PublishError:
        observer.broker_connected(False)
    scheduler.add_job(
        refresh_table_gauges,
        "interval",
        args=[observer, relay.store],
        seconds=values.get("metrics_interval") or 15.0,
        id="table_gauges",
        coalesce=True,
        max_instances=1,
    )
    # With a retention of 0 rows are deleted on delivery; the job still clears
    # rows delivered before the setting changed.
    keep = retention.retention_seconds(values)
    scheduler.add_job(
        retention.purge_delivered,
        "interval",
        args=[relay.store, keep],
        seconds=PURGE_INTERVAL,
        id="retention",
        coalesce=True,
        max_instances=1,
    )
    server = None
    port = values.get("http_port") or 0
    if port:
        server = HealthServer(
            host=values.get("http_host") or "0.0.0.0",
            port=port,
            liveness=health.liveness(observer, max_silence(relay)),
            readiness=health.readiness(relay.store.engine),
            metrics=observer.exposition,
        )
        server.start()
    return Operations(observer=observer, server=server)
