"""The relay process's own jobs (outbox.cli.runner, outbox.ops.operations), against a real
PostgreSQL."""

from __future__ import annotations

import logging
import re

import pytest
from sqlalchemy import Engine

from outbox.cli.runner import build_relay
from outbox.errors import StoreUnavailable
from outbox.logs import FIELDS_ATTR
from outbox.ops.metrics import PrometheusObserver
from outbox.ops.operations import BACKLOG_LOG_INTERVAL, BacklogJob, sql_store
from outbox.store.rows import Backlog
from outbox.store.sqlstore import SqlStore
from tests.ops_support import publish_events, relay_values


def _records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, FIELDS_ATTR, {}).get("event") == event]


def test_the_backlog_line_names_an_age_only_when_a_row_is_pending(
    pg_engine: Engine, pg_url_fixture: str, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: an empty table logged `pending 0, dead 0, oldest pending Nones`."""
    relay = build_relay(relay_values(database_url=pg_url_fixture, broker_url=amqp_url))
    # Runs as far apart as the log line: each run logs.
    job = BacklogJob(sql_store(relay), PrometheusObserver(), interval=BACKLOG_LOG_INTERVAL)
    try:
        with caplog.at_level(logging.INFO, logger="outbox"):
            job()
            publish_events(pg_engine, 1, range(1, 3))
            job()
    finally:
        sql_store(relay).engine.dispose()
    empty, busy = _records(caplog, "backlog")
    assert empty.getMessage() == "pending 0, dead 0"
    assert getattr(empty, FIELDS_ATTR)["oldest_pending_age_seconds"] is None  # JSON null
    assert re.fullmatch(r"pending 2, dead 0, oldest pending \d+\.\ds ago", busy.getMessage())
    assert isinstance(getattr(busy, FIELDS_ATTR)["oldest_pending_age_seconds"], float)


class CountingStore(SqlStore):
    """The real store, keeping what each of its backlog reads returned."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.readings: list[Backlog] = []

    def backlog(self) -> Backlog:
        reading = super().backlog()
        self.readings.append(reading)
        return reading


def test_one_backlog_read_per_run_feeds_the_gauges_and_the_log_line(
    pg_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the gauges job (every 15 s) and the backlog line's job (every 30 s)
    each read the backlog: three queries per 30 s instead of two."""
    store = CountingStore(pg_engine)
    observer = PrometheusObserver()
    job = BacklogJob(store, observer, interval=15.0)
    assert job.log_every == 2  # a line every 30 s, as before
    gauge = observer.registry.get_sample_value
    with caplog.at_level(logging.INFO, logger="outbox"):
        for version in range(1, 5):
            publish_events(pg_engine, 1, range(version, version + 1))
            job()
            assert len(store.readings) == version  # one query per run
            assert gauge("outbox_backlog_events") == version  # the gauges, every run
    lines = _records(caplog, "backlog")
    # The line every second run, from the very reading the gauges got.
    assert [getattr(r, FIELDS_ATTR)["pending"] for r in lines] == [2, 4]
    assert [r.pending for r in store.readings] == [1, 2, 3, 4]
    oldest = store.readings[-1].oldest_pending_created_at
    assert oldest is not None
    assert gauge("outbox_oldest_pending_created_timestamp_seconds") == oldest.timestamp()


def test_a_failed_backlog_read_is_reported_by_both_consumers(
    pg_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class Unreachable(SqlStore):
        def backlog(self) -> Backlog:
            raise StoreUnavailable("database unreachable")

    job = BacklogJob(Unreachable(pg_engine), PrometheusObserver(), interval=15.0)
    with caplog.at_level(logging.INFO, logger="outbox"):
        for _ in range(4):
            job()
    assert len(_records(caplog, "metrics_refresh_failed")) == 4
    assert len(_records(caplog, "backlog_unknown")) == 2  # when a line was due
    assert _records(caplog, "backlog") == []


@pytest.mark.parametrize(
    ("interval", "log_every"), [(0.2, 150), (10.0, 3), (15.0, 2), (30.0, 1), (120.0, 1)]
)
def test_the_log_line_comes_every_30_seconds_at_any_gauge_interval(
    sqlite_engine: Engine, interval: float, log_every: int
) -> None:
    job = BacklogJob(SqlStore(sqlite_engine), PrometheusObserver(), interval=interval)
    assert job.log_every == log_every
