from __future__ import annotations

import contextlib
import io
import uuid

import kombu
import pytest
from sqlalchemy import Engine

from outbox.errors import PublishError
from outbox.ops.progress import Progress
from outbox.relay.loop import Relay
from outbox.relay.publisher import open_publisher
from outbox.relay.replay import ReplaySelection, replay
from outbox.store.admin import AdminStore
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url
from tests.ops_support import publish_events, run_cli, versions_of


@pytest.fixture
def delivered(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> list[uuid.UUID]:
    """Keys case:1:7 and case:1:8, three versions each, interleaved, all delivered."""
    ids: list[uuid.UUID] = []
    for version in range(1, 4):
        ids += publish_events(pg_engine, 7, range(version, version + 1))
        ids += publish_events(pg_engine, 8, range(version, version + 1))
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    assert relay.drain(timeout=30) == 6
    assert len(drain_queue(amqp_url, bound_queue, expected=6)) == 6
    return ids


def cli(pg_database: str, amqp_url: str, exchange: str, *args: str) -> int:
    return run_cli(
        [
            "replay",
            *args,
            "--database-url",
            pg_url(pg_database),
            "--broker-url",
            amqp_url,
            "--exchange",
            exchange,
        ]
    )


def test_replay_by_key_keeps_ids_and_order_and_leaves_rows_delivered(
    delivered: list[uuid.UUID],
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(pg_database, amqp_url, exchange_name, "--key", "case:1:7") == 0
    assert "replayed 3 events" in capsys.readouterr().out
    messages = drain_queue(amqp_url, bound_queue, expected=3)
    assert versions_of(messages) == [1, 2, 3]
    assert [m.properties["message_id"] for m in messages] == [str(i) for i in delivered[0::2]]
    assert all(m.headers["outbox-replay"] == "true" for m in messages)
    assert all(m.headers["ce-id"] == m.properties["message_id"] for m in messages)
    counts = SqlStore(pg_engine).counts()
    assert (counts["delivered"], counts["pending"]) == (6, 0)
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.3) == []


def test_replay_since_a_time_is_in_position_order(
    delivered: list[uuid.UUID],
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "4")  # two batches
    assert cli(pg_database, amqp_url, exchange_name, "--since", "1h") == 0
    messages = drain_queue(amqp_url, bound_queue, expected=6)
    assert [m.properties["message_id"] for m in messages] == [str(i) for i in delivered]
    assert cli(pg_database, amqp_url, exchange_name, "--since", "2999-01-01T00:00:00Z") == 0
    assert "replayed 0 events" in capsys.readouterr().out


def test_replay_by_ids_and_dry_run(
    delivered: list[uuid.UUID],
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    chosen = [str(delivered[4]), str(delivered[1])]
    assert cli(pg_database, amqp_url, exchange_name, "--ids", *chosen, "--dry-run") == 0
    assert "2 delivered events match" in capsys.readouterr().out
    assert drain_queue(amqp_url, bound_queue, expected=1, timeout=0.3) == []
    assert cli(pg_database, amqp_url, exchange_name, "--ids", *chosen) == 0
    messages = drain_queue(amqp_url, bound_queue, expected=2)
    # Position order, whatever the order on the command line.
    assert [m.properties["message_id"] for m in messages] == [chosen[1], chosen[0]]


def test_replay_needs_a_selection(
    pg_database: str, amqp_url: str, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(pg_database, amqp_url, exchange_name) == 2
    assert "--since, --key or --ids" in capsys.readouterr().err


def test_a_refused_replay_says_where_to_resume(
    delivered: list[uuid.UUID], pg_engine: Engine, amqp_url: str
) -> None:
    unbound = f"outbox-test-unbound-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(PublishError, match="resume with --after-position 0"):
            replay(
                AdminStore(pg_engine),
                open_publisher(amqp_url, unbound),
                ReplaySelection(keys=["case:1:7"]),
                attempts=1,
            )
    finally:
        with kombu.Connection(amqp_url) as connection, contextlib.suppress(Exception):
            connection.channel().exchange_delete(unbound)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_rate_remaining_and_eta_only_on_a_terminal() -> None:
    screen = Terminal()
    progress = Progress("replay", 100, stream=screen, interval=0)
    progress.advance(40)
    progress.finish()
    last = screen.getvalue().split("\r")[-1]
    assert "replay: 40/100" in last and "/s" in last
    assert "remaining 60" in last and "ETA " in last
    pipe = io.StringIO()
    quiet = Progress("replay", 100, stream=pipe, interval=0)
    quiet.advance(40)
    quiet.finish()
    assert pipe.getvalue() == ""


def test_drain_publishes_the_backlog_and_exits(
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish_events(pg_engine, 7, range(1, 8))
    args = ["drain", "--database-url", pg_url(pg_database), "--broker-url", amqp_url]
    assert run_cli([*args, "--exchange", exchange_name]) == 0
    assert "published 7 events; 0 still pending" in capsys.readouterr().out
    assert versions_of(drain_queue(amqp_url, bound_queue, expected=7)) == list(range(1, 8))
