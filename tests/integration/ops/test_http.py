from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine

from outbox.errors import ConfigurationError
from outbox.ops import health
from outbox.ops.http import Check, Exposition, HealthServer
from outbox.ops.metrics import PrometheusObserver
from outbox.store.engine import create_outbox_engine
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
def serving(
    liveness: Check, readiness: Check, metrics: Exposition | None = None
) -> Iterator[HealthServer]:
    server = HealthServer(
        host="127.0.0.1", port=0, liveness=liveness, readiness=readiness, metrics=metrics
    )
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
            from outbox.store import migrate

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


# -- HTTP/1.1 and HEAD ---------------------------------------------------------


def test_every_path_answers_get_and_head_over_one_kept_alive_connection() -> None:
    observer = PrometheusObserver()
    expected = {"/livez": 200, "/readyz": 503, "/metrics": 200, "/nothing-here": 404}
    with serving(
        lambda: (True, "alive"), lambda: (False, "not yet"), observer.exposition
    ) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            connection.connect()
            sock = connection.sock
            for path, status in expected.items():
                connection.request("GET", path)
                got = connection.getresponse()
                body = got.read()
                assert (got.version, got.status, got.will_close) == (11, status, False), path
                assert int(got.headers["Content-Length"]) == len(body) > 0
                connection.request("HEAD", path)
                head = connection.getresponse()
                assert (head.version, head.status, head.will_close) == (11, status, False), path
                assert head.read() == b""
                assert head.headers["Content-Type"] == got.headers["Content-Type"]
                if path != "/metrics":  # a scrape's length changes as values do
                    assert head.headers["Content-Length"] == got.headers["Content-Length"]
                assert connection.sock is sock, f"{path}: the connection was not kept alive"
        finally:
            connection.close()


def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers and the bytes after the headers."""
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (h.split(":", 1) for h in lines)}
    return status, headers, rest


def test_head_sends_headers_only_and_connection_close_is_honoured() -> None:
    with serving(lambda: (True, "alive"), lambda: (True, "ready")) as server:
        # Pipelined: if HEAD sent a body, the second response would not follow its headers.
        data = exchange(
            server.port,
            b"HEAD /livez HTTP/1.1\r\nHost: probe\r\n\r\n"
            b"GET /livez HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n",
        )
        status, headers, rest = split_response(data)
        assert status == "HTTP/1.1 200 OK"
        length = int(headers["content-length"])
        assert "connection" not in headers  # kept alive
        status, headers, body = split_response(rest)
        assert status == "HTTP/1.1 200 OK", rest[:40]
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == length == len(body)
        assert json.loads(body)["status"] == "ok"
        # An HTTP/1.0 client without keep-alive gets its answer, then the close.
        status, headers, body = split_response(
            exchange(server.port, b"HEAD /readyz HTTP/1.0\r\n\r\n")
        )
        assert (status, headers["connection"], body) == ("HTTP/1.1 200 OK", "close", b"")
