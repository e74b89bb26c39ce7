from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from outbox.logs import emit
from outbox.ops.logformat import JsonFormatter, TextFormatter
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.store.sqlstore import SqlStore
from tests.ops_support import free_port, insert_invalid_row, publish_events


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything the outbox loggers write, formatted as the relay writes it in production."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("outbox")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield stream
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_records_about_an_event_carry_its_id_and_key_and_no_password(
    pg_engine: Engine, json_lines: io.StringIO
) -> None:
    dead_id = insert_invalid_row(pg_engine, "case:1:5")
    publish_events(pg_engine, 7, range(1, 3))
    secret_url = f"amqp://relay:s3cret-pw@127.0.0.1:{free_port()}//"
    relay = Relay(
        SqlStore(pg_engine),
        open_publisher(secret_url, "outbox"),
        RelaySettings(backoff_initial=0.01, backoff_max=0.01),
    )
    relay.drain(timeout=1.0)
    out = records(json_lines)
    assert all(isinstance(r["event"], str) and r["event"] != "log" for r in out), out
    (dead,) = [r for r in out if r["event"] == "relay_event_dead"]
    assert (dead["event_id"], dead["key"]) == (str(dead_id), "case:1:5")
    unavailable = [r for r in out if r["event"] == "relay_broker_unavailable"]
    assert unavailable and "relay:***@" in str(unavailable[0]["message"])
    # One warning when the trouble starts; the retries after it are debug records.
    assert len(unavailable) >= 2
    assert [r["level"] for r in unavailable] == ["warning"] + ["debug"] * (len(unavailable) - 1)
    assert not [r for r in out if r["event"] == "relay_error"]
    assert "s3cret-pw" not in json_lines.getvalue()


def test_formatters_redact_passwords_in_messages_fields_and_tracebacks() -> None:
    logger = logging.getLogger("outbox.test_logs")
    url = "postgresql://app:hunter2@db:5432/app?password=hunter2"
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "cannot reach %s", (url,), None
    )
    setattr(record, "outbox_fields", {"event": "x", "url": url})  # noqa: B010
    try:
        raise RuntimeError(f"connect failed: {url}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    for formatter in (JsonFormatter(), TextFormatter()):
        assert "hunter2" not in formatter.format(record)


def test_emit_writes_the_event_name_and_fields(json_lines: io.StringIO) -> None:
    emit(logging.getLogger("outbox.test"), "thing_done", "did %d", 3, count=3, key="k")
    (record,) = records(json_lines)
    assert (record["event"], record["message"], record["count"], record["key"]) == (
        "thing_done",
        "did 3",
        3,
        "k",
    )
