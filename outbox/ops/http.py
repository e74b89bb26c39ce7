"""A small HTTP server for probes and scraping: ``/livez``, ``/readyz``, ``/metrics``.

Standard library only, one daemon thread per request (a slow database check
never blocks a liveness probe). Each check is a callable returning
``(ok, detail)``; the server only reports, it decides nothing.

- ``/livez``: the relay loop is going round (it ticked, or reported a failure it
  is retrying, recently). Failing it means "restart me".
- ``/readyz``: configuration valid, database reachable, schema migrated to the
  head revision. A broker outage does NOT make the relay unready: see
  docs/operations.md (in short, readiness gates traffic to the pod, and as a
  sidecar an unready relay would take the whole service out of its load balancer
  exactly when the outbox is absorbing the outage).
- ``/metrics``: the Prometheus text format.

Every path answers ``GET`` and ``HEAD`` (the same status and headers, no body)
over HTTP/1.1: connections are kept alive between requests (a scraper reuses
one), every response carries its ``Content-Length``, and a connection idle for
:data:`IDLE_TIMEOUT` seconds is closed, so that idle keep-alive clients cannot
pile up threads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from outbox.errors import ConfigurationError
from outbox.logs import emit

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
Exposition = Callable[[], tuple[bytes, str]]

IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request


class HealthServer:
    """Serves the probes and metrics on ``host:port`` until :meth:`stop`."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        liveness: Check,
        readiness: Check,
        metrics: Exposition | None = None,
    ) -> None:
        routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {
            "/livez": lambda: _probe(liveness),
            "/readyz": lambda: _probe(readiness),
        }
        if metrics is not None:
            exposition = metrics

            def scrape() -> tuple[int, bytes, str]:
                body, content_type = exposition()
                return 200, body, content_type

            routes["/metrics"] = scrape
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(routes))
        except OSError as exc:
            raise ConfigurationError(
                f"--http-port: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        emit(
            log,
            "http_started",
            "serving /livez /readyz /metrics on port %d",
            self.port,
            port=self.port,
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _probe(check: Check) -> tuple[int, bytes, str]:
    try:
        ok, detail = check()
    except Exception as exc:  # a probe must answer, whatever the check raised
        ok, detail = False, f"check failed: {type(exc).__name__}"
    body = json.dumps({"status": "ok" if ok else "fail", "detail": detail}) + "\n"
    return (200 if ok else 503), body.encode(), "application/json"


def _handler(
    routes: dict[str, Callable[[], tuple[int, bytes, str]]],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "outbox"
        protocol_version = "HTTP/1.1"  # keep-alive; every response has a Content-Length
        timeout = IDLE_TIMEOUT

        def do_GET(self) -> None:
            self._respond(with_body=True)

        def do_HEAD(self) -> None:
            self._respond(with_body=False)

        def _respond(self, *, with_body: bool) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                status, body, content_type = 404, b"not found\n", "text/plain"
            else:
                status, body, content_type = route()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            # parse_request decided from the request's version and Connection header.
            if self.close_connection:
                self.send_header("Connection", "close")
            elif self.request_version == "HTTP/1.0":
                self.send_header("Connection", "keep-alive")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Probes every few seconds would drown the relay's own records.
            emit(log, "http_request", "http %s", format % args, level=logging.DEBUG)

    return Handler
