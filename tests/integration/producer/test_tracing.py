from __future__ import annotations

import kombu
import pytest
from sqlalchemy import Engine, select

from outbox.relay.loop import Relay
from outbox.relay.publisher import open_publisher
from outbox.store import table
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue
from tests.ops_support import publish_events

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")


def stored_headers(engine: Engine) -> list[dict[str, str] | None]:
    with engine.connect() as connection:
        rows = connection.execute(select(table.event.c.headers).order_by(table.event.c.position))
        return [r.headers for r in rows]


def test_the_producers_span_reaches_the_message_headers(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    tracer = sdk_trace.TracerProvider().get_tracer("test")  # no global provider needed
    with tracer.start_as_current_span("PUT /cases/7") as span:
        publish_events(pg_engine, 7, range(1, 2))
        context = span.get_span_context()
    publish_events(pg_engine, 7, range(2, 3))  # outside any span
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    first, second = stored_headers(pg_engine)
    assert first is not None and first["traceparent"] == expected
    assert "traceparent" not in (second or {})
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    assert relay.drain(timeout=30) == 2
    with_trace, without = drain_queue(amqp_url, bound_queue, expected=2)
    assert with_trace.headers["traceparent"] == expected
    assert "traceparent" not in without.headers


def test_an_explicit_traceparent_wins(pg_engine: Engine) -> None:
    from sqlalchemy.orm import Session

    import outbox

    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    tracer = sdk_trace.TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("job"), Session(pg_engine) as session, session.begin():
        outbox.publish(
            session,
            outbox.Envelope(
                action="create",
                schema="https://example.org/schemas/case.json",
                content={"tenantId": 1, "id": 9},
            ),
            headers={"traceparent": given},
        )
    (headers,) = stored_headers(pg_engine)
    assert headers is not None and headers["traceparent"] == given
