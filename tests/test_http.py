from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine

from outbox import health
from outbox.database import create_outbox_engine
from outbox.errors import ConfigurationError
from outbox.http import Check, HealthServer
from outbox.metrics import PrometheusObserver
from tests.conftest import pg_url
from tests.ops_support import (
    closed_port_url,
    free_port,
    get,
    publish_events,
    relay_values,
    running_relay,
    scrape,
    wait_for,
)


@contextmanager
def serving(liveness: Check, readiness: Check) -> Iterator[HealthServer]:
    server = HealthServer(host="127.0.0.1", port=0, liveness=liveness, readiness=readiness)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_probes_stay_healthy_during_a_broker_outage(pg_database: str, pg_engine: Engine) -> None:
    publish_events(pg_engine, 7, range(1, 4))
    port = free_port()
    values = relay_values(
        database_url=pg_url(pg_database),
        broker_url=closed_port_url(),
        http_port=str(port),
    )
    with running_relay(values):
        samples = wait_for(
            lambda: (
                (s := scrape(port)).get("outbox_broker_connection_failures_total", 0) >= 1 and s
            ),
            what="the relay to fail to reach the broker",
        )
        assert samples["outbox_broker_connected"] == 0
        assert samples["outbox_backlog_events"] == 3
        ready, body = get(port, "/readyz")
        assert (ready, json.loads(body)["status"]) == (200, "ok")
        live, body = get(port, "/livez")
        assert (live, json.loads(body)["status"]) == (200, "ok")
        assert get(port, "/nothing-here")[0] == 404


def test_readyz_fails_until_the_schema_is_migrated(empty_pg_database: str) -> None:
    engine = create_outbox_engine(pg_url(empty_pg_database))
    try:
        with serving(lambda: (True, "alive"), health.readiness(engine, cache_seconds=0)) as server:
            status, body = get(server.port, "/readyz")
            assert status == 503
            assert "outbox migrate" in json.loads(body)["detail"]
            from outbox import migrate

            migrate.upgrade(engine)
            status, body = get(server.port, "/readyz")
            assert status == 200, body
    finally:
        engine.dispose()


def test_readyz_fails_when_the_database_is_unreachable_and_hides_the_password() -> None:
    port = free_port()
    engine = create_outbox_engine(f"postgresql://app:s3cret-pw@127.0.0.1:{port}/app")
    try:
        with serving(lambda: (True, "alive"), health.readiness(engine)) as server:
            status, body = get(server.port, "/readyz")
    finally:
        engine.dispose()
    assert status == 503
    assert "database unreachable" in json.loads(body)["detail"]
    assert "s3cret-pw" not in body


def test_livez_fails_when_the_loop_goes_silent() -> None:
    observer = PrometheusObserver()
    with serving(health.liveness(observer, max_silence=3600), lambda: (True, "ready")) as server:
        assert get(server.port, "/livez")[0] == 200
    with serving(health.liveness(observer, max_silence=0), lambda: (True, "ready")) as server:
        status, body = get(server.port, "/livez")
        assert status == 503
        assert "silent" in json.loads(body)["detail"]


def test_a_port_in_use_is_a_configuration_error() -> None:
    with (
        serving(lambda: (True, ""), lambda: (True, "")) as server,
        pytest.raises(ConfigurationError, match="cannot listen"),
    ):
        HealthServer(
            host="127.0.0.1",
            port=server.port,
            liveness=lambda: (True, ""),
            readiness=lambda: (True, ""),
        )
