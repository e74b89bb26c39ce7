from __future__ import annotations

import datetime as dt
import re
import time

import kombu
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.exposition import generate_latest
from sqlalchemy import Engine

from outbox.ops.metrics import PrometheusObserver, refresh_table_gauges
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url
from tests.ops_support import (
    free_port,
    insert_invalid_row,
    publish_events,
    relay_values,
    running_relay,
    scrape,
    versions_of,
    wait_for,
)
from tests.paths import DOCS


def test_metrics_scraped_over_http_while_relaying(
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    publish_events(pg_engine, 7, range(1, 6))
    insert_invalid_row(pg_engine, "case:1:99")
    port = free_port()
    values = relay_values(
        database_url=pg_url(pg_database),
        broker_url=amqp_url,
        exchange=exchange_name,
        http_port=str(port),
    )
    with running_relay(values):
        samples = wait_for(
            lambda: (
                (s := scrape(port)).get("outbox_published_events_total") == 5
                and s.get("outbox_dead_events") == 1
                and s.get("outbox_backlog_events") == 0
                and s
            ),
            what="5 published, 1 dead, backlog 0 on /metrics",
        )
    assert samples["outbox_validation_failures_total"] == 1
    assert samples['outbox_events_marked_dead_total{cause="invalid"}'] == 1
    assert samples["outbox_broker_connected"] == 1
    assert samples["outbox_database_available"] == 1
    assert samples["outbox_partitions_owned"] == 16
    assert samples["outbox_partitions_standby"] == 0
    assert samples["outbox_batch_size_events_count"] >= 1
    assert samples["outbox_batch_size_events_sum"] == 5
    assert samples["outbox_batch_duration_seconds_count"] >= 1
    assert samples['outbox_publish_failures_total{reason="nacked"}'] == 0
    assert samples["outbox_oldest_pending_created_timestamp_seconds"] == 0
    assert samples["outbox_loop_last_tick_timestamp_seconds"] > 0
    build = [name for name in samples if name.startswith("outbox_build_info{")]
    assert len(build) == 1 and 'version="' in build[0]
    assert all(name.startswith(("outbox_", "process_", "python_")) for name in samples)
    assert versions_of(drain_queue(amqp_url, bound_queue, expected=5)) == [1, 2, 3, 4, 5]


def test_table_gauges_read_the_backlog_from_the_database(pg_engine: Engine) -> None:
    before = dt.datetime.now(dt.UTC)
    publish_events(pg_engine, 1, range(1, 4))
    publish_events(pg_engine, 2, range(1, 3))
    observer = PrometheusObserver()
    assert refresh_table_gauges(observer, SqlStore(pg_engine))
    registry = observer.registry
    assert registry.get_sample_value("outbox_backlog_events") == 5
    assert registry.get_sample_value("outbox_dead_events") == 0
    oldest = registry.get_sample_value("outbox_oldest_pending_created_timestamp_seconds")
    assert oldest is not None
    # The database's clock stamped the rows; allow for clock skew within a second.
    assert before.timestamp() - 1 <= oldest <= dt.datetime.now(dt.UTC).timestamp() + 1


def test_each_observer_has_its_own_registry() -> None:
    first, second = PrometheusObserver(), PrometheusObserver()
    first.batch_published(3, 0.01)
    first.publish_failed("timeout", 3)
    first.partitions_changed([0, 1, 2], 16)
    assert first.registry.get_sample_value("outbox_published_events_total") == 3
    assert second.registry.get_sample_value("outbox_published_events_total") == 0
    assert (
        first.registry.get_sample_value("outbox_publish_failures_total", {"reason": "timeout"}) == 3
    )
    assert first.registry.get_sample_value("outbox_partitions_owned") == 3
    assert first.registry.get_sample_value("outbox_partitions_standby") == 13


def test_every_metric_is_documented() -> None:

    page = (DOCS / "operations.md").read_text()
    suffix = {"counter": "_total", "info": "_info"}
    names = [m.name + suffix.get(m.type, "") for m in PrometheusObserver().registry.collect()]
    assert len(names) > 10
    # prometheus_client's own collectors are documented by family.
    families = ("process_", "python_gc_", "python_info")
    ours = [n for n in names if not n.startswith(families)]
    assert [n for n in ours if f"`{n}`" not in page and f"`{n}{{" not in page] == []
    assert {f for f in families if any(n.startswith(f) for n in names)} == set(families)
    assert all(f"`{f}" in page for f in families)


def test_delivery_lag_process_metrics_and_no_created_series_on_a_scrape(
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    start = time.time()
    for key_id in (1, 2, 3):
        publish_events(pg_engine, key_id, range(1, 5))
    port = free_port()
    values = relay_values(
        database_url=pg_url(pg_database),
        broker_url=amqp_url,
        exchange=exchange_name,
        http_port=str(port),
    )
    with running_relay(values):
        samples = wait_for(
            lambda: (s := scrape(port)).get("outbox_published_events_total") == 12 and s,
            what="12 published on /metrics",
        )
    elapsed = time.time() - start
    assert samples["outbox_delivery_lag_seconds_count"] == 12  # one per delivered event
    assert samples['outbox_delivery_lag_seconds_bucket{le="+Inf"}'] == 12
    # Each lag is between 0 and the test's duration (a second of clock skew allowed).
    assert 0 <= samples["outbox_delivery_lag_seconds_sum"] <= 12 * (elapsed + 1)
    assert samples["process_resident_memory_bytes"] > 0
    assert samples["process_cpu_seconds_total"] > 0
    assert samples["process_open_fds"] > 0
    assert any(name.startswith("python_info{") for name in samples)
    assert any(name.startswith("python_gc_collections_total{") for name in samples)
    assert [name for name in samples if name.split("{")[0].endswith("_created")] == []
    assert len(drain_queue(amqp_url, bound_queue, expected=12)) == 12


def test_delivery_lag_is_measured_from_each_created_at() -> None:
    observer = PrometheusObserver()
    now = dt.datetime.now(dt.UTC)
    # Two seconds old, a minute old, and one from a database clock ahead of ours.
    observer.events_confirmed(
        [now - dt.timedelta(seconds=2), now - dt.timedelta(minutes=1), now + dt.timedelta(1)]
    )
    value = observer.registry.get_sample_value
    assert value("outbox_delivery_lag_seconds_count") == 3
    assert value("outbox_delivery_lag_seconds_bucket", {"le": "0.005"}) == 1  # clamped to 0
    assert value("outbox_delivery_lag_seconds_bucket", {"le": "1.0"}) == 1
    assert value("outbox_delivery_lag_seconds_bucket", {"le": "2.5"}) == 2
    assert value("outbox_delivery_lag_seconds_bucket", {"le": "60.0"}) == 2
    assert value("outbox_delivery_lag_seconds_bucket", {"le": "300.0"}) == 3


def test_created_series_are_dropped_from_the_relays_scrape_only() -> None:
    observer = PrometheusObserver()
    observer.batch_published(3, 0.01)
    body, _ = observer.exposition()
    assert b"outbox_published_events_total 3.0" in body
    assert re.findall(rb"^\w+_created\b.*$", body, re.M) == []
    # The application's own registries keep theirs: no process-wide switch was flipped.
    assert prometheus_client.metrics._use_created
    theirs = CollectorRegistry()
    Counter("app_requests", "Requests.", registry=theirs).inc()
    assert re.findall(rb"^app_requests_created ", generate_latest(theirs), re.M)
    # A registry passed in that holds a process collector already is fine too.
    ProcessCollector(registry=theirs)
    PrometheusObserver(theirs).batch_published(1, 0.01)
    assert theirs.get_sample_value("outbox_published_events_total") == 1
