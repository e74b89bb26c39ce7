"""The relay process's own jobs (outbox.cli.runner), against a real PostgreSQL."""

from __future__ import annotations

import logging
import re

import pytest
from sqlalchemy import Engine

from outbox.cli.runner import _report_backlog, build_relay
from outbox.logs import FIELDS_ATTR
from tests.ops_support import publish_events, relay_values


def test_the_backlog_line_names_an_age_only_when_a_row_is_pending(
    pg_engine: Engine, pg_url_fixture: str, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: an empty table logged `pending 0, dead 0, oldest pending Nones`."""
    relay = build_relay(relay_values(database_url=pg_url_fixture, broker_url=amqp_url))
    try:
        with caplog.at_level(logging.INFO, logger="outbox"):
            _report_backlog(relay)
            publish_events(pg_engine, 1, range(1, 3))
            _report_backlog(relay)
    finally:
        relay.store.engine.dispose()
    empty, busy = (
        r for r in caplog.records if getattr(r, FIELDS_ATTR, {}).get("event") == "backlog"
    )
    assert empty.getMessage() == "pending 0, dead 0"
    assert getattr(empty, FIELDS_ATTR)["oldest_pending_age_seconds"] is None  # JSON null
    assert re.fullmatch(r"pending 2, dead 0, oldest pending \d+\.\ds ago", busy.getMessage())
    assert isinstance(getattr(busy, FIELDS_ATTR)["oldest_pending_age_seconds"], float)
