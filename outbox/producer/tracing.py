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
_in_span: Callable[[], bool]
try:
    from opentelemetry.propagate import inject as _otel_inject
    from opentelemetry.trace import get_current_span
except ImportError:  # no hard dependency
    _inject = None
    _in_span = bool
else:
    _inject = _otel_inject

    def _in_span() -> bool:
        return bool(get_current_span().get_span_context().is_valid)


def current_trace_headers() -> dict[str, str]:
    """The active span's trace context as headers; empty outside a span or without OTel."""
    # traceparent/tracestate exist only for a valid span context: outside a span,
    # skip the propagators (they cost more than the rest of publish).
    if _inject is None or not _in_span():
        return {}
    carrier: dict[str, str] = {}
    _inject(carrier)
    return {name: carrier[name] for name in TRACE_HEADERS if name in carrier}
