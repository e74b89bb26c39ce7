"""Trace context for events: W3C ``traceparent``/``tracestate`` of the producer's span.

OpenTelemetry is optional. When it is installed and the producer's transaction
runs inside a span, the row stores the span's context; the relay copies the
row's headers into the message, so a consumer's trace links back to the
request that changed the resource. Without OpenTelemetry, a producer can pass
``headers={"traceparent": ...}`` itself.
"""

from __future__ import annotations

from collections.abc import Callable

TRACE_HEADERS = ("traceparent", "tracestate")

_inject: Callable[[dict[str, str]], None] | None
try:
    from opentelemetry.propagate import inject as _otel_inject
except ImportError:  # no hard dependency
    _inject = None
else:
    _inject = _otel_inject


def current_trace_headers() -> dict[str, str]:
    """The active span's trace context as headers; empty outside a span or without OTel."""
    if _inject is None:
        return {}
    carrier: dict[str, str] = {}
    _inject(carrier)
    return {name: carrier[name] for name in TRACE_HEADERS if name in carrier}
