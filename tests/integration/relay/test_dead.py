from __future__ import annotations

import json
import uuid

import kombu
import pytest
from sqlalchemy import Engine, select, update

from outbox.relay.loop import Relay
from outbox.relay.publisher import open_publisher
from outbox.store import table
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url
from tests.ops_support import (
    envelope_json,
    insert_invalid_row,
    publish_events,
    run_cli,
    versions_of,
)

KEY = "case:1:7"


def drain(engine: Engine, amqp_url: str, exchange: str) -> int:
    return Relay(SqlStore(engine), open_publisher(amqp_url, exchange)).drain(timeout=30)


@pytest.fixture
def held_key(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> uuid.UUID:
    """Key case:1:7: version 1 delivered, then a dead row, then versions 3 and 4 held."""
    publish_events(pg_engine, 7, range(1, 2))
    dead_id = insert_invalid_row(pg_engine, KEY)
    publish_events(pg_engine, 7, range(3, 5))
    assert drain(pg_engine, amqp_url, exchange_name) == 1
    assert versions_of(drain_queue(amqp_url, bound_queue, expected=1)) == [1]
    return dead_id


def db_args(pg_database: str) -> list[str]:
    return ["--database-url", pg_url(pg_database)]


def audit(engine: Engine) -> list[tuple[str, str, str, str]]:
    A = table.dead_letter_audit
    with engine.connect() as connection:
        rows = connection.execute(
            select(A.c.event_id, A.c.operation, A.c.actor, A.c.reason).order_by(A.c.id)
        )
        return [(str(r.event_id), r.operation, r.actor, r.reason) for r in rows]


def state_of(engine: Engine, event_id: uuid.UUID) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                select(table.event.c.state).where(table.event.c.event_id == event_id)
            ).scalar_one()
        )


def test_list_shows_the_dead_row_its_reason_and_what_it_holds(
    held_key: uuid.UUID, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["dead", "list", "--json", *db_args(pg_database)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["event_id"] == str(held_key)
    assert row["key"] == KEY
    assert row["held_behind"] == 2
    assert "invalid JSON" in row["reason"]
    assert run_cli(["dead", "list", *db_args(pg_database)]) == 0
    table_output = capsys.readouterr().out
    assert str(held_key) in table_output and "invalid JSON" in table_output


def test_skip_lets_the_held_key_continue_in_order(
    held_key: uuid.UUID,
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["dead", "skip", str(held_key), "--actor", "alice", "--reason", "bad row, not needed"]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    assert f"{held_key} skipped (by alice" in capsys.readouterr().out
    assert state_of(pg_engine, held_key) == "skipped"
    assert audit(pg_engine) == [(str(held_key), "skip", "alice", "bad row, not needed")]
    assert drain(pg_engine, amqp_url, exchange_name) == 2
    assert versions_of(drain_queue(amqp_url, bound_queue, expected=2)) == [3, 4]
    assert run_cli(["dead", "show", str(held_key), "--json", *db_args(pg_database)]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["state"] == "skipped"
    assert [(a["operation"], a["actor"]) for a in shown["audit"]] == [("skip", "alice")]


def test_retry_after_a_fix_publishes_the_row_before_the_rest_of_its_key(
    held_key: uuid.UUID,
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pg_engine.begin() as connection:  # the fix: whoever wrote the row repairs it
        connection.execute(
            update(table.event)
            .where(table.event.c.event_id == held_key)
            .values(payload=envelope_json(7, 2))
        )
    args = ["dead", "retry", str(held_key), "--actor", "bob", "--reason", "payload repaired"]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    assert "back to pending" in capsys.readouterr().out
    assert drain(pg_engine, amqp_url, exchange_name) == 3
    messages = drain_queue(amqp_url, bound_queue, expected=3)
    assert versions_of(messages) == [2, 3, 4]
    assert messages[0].properties["message_id"] == str(held_key)
    assert state_of(pg_engine, held_key) == "delivered"
    assert audit(pg_engine) == [(str(held_key), "retry", "bob", "payload repaired")]
    assert run_cli(["dead", "show", str(held_key), *db_args(pg_database)]) == 0
    shown = capsys.readouterr().out
    assert "retry by bob: payload repaired" in shown


def test_changes_need_a_reason_and_a_dead_row(
    held_key: uuid.UUID,
    pg_database: str,
    pg_engine: Engine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(["dead", "retry", str(held_key), *db_args(pg_database)]) == 2
    assert "--reason is required" in capsys.readouterr().err
    other = uuid.uuid4()
    args = ["dead", "skip", str(held_key), str(other), "--reason", "cleanup"]
    assert run_cli([*args, *db_args(pg_database)]) == 1
    assert "is not dead" in capsys.readouterr().err
    # All or nothing: the first id was not skipped either.
    assert state_of(pg_engine, held_key) == "dead"
    assert audit(pg_engine) == []
    assert run_cli(["dead", "retry", "not-a-uuid", "--reason", "x", *db_args(pg_database)]) == 2


# -- selections: --key, --reason-contains, --all, --dry-run ------------------------


@pytest.fixture
def dead_of_three_keys(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> dict[str, uuid.UUID]:
    """One dead row in each of keys case:1:7 and case:1:8 (invalid JSON), case:1:9 (envelope)."""
    dead = {
        "case:1:7": insert_invalid_row(pg_engine, "case:1:7"),
        "case:1:8": insert_invalid_row(pg_engine, "case:1:8"),
        "case:1:9": insert_invalid_row(pg_engine, "case:1:9", payload='{"action": "update"}'),
    }
    assert drain(pg_engine, amqp_url, exchange_name) == 0
    assert {state_of(pg_engine, event_id) for event_id in dead.values()} == {"dead"}
    return dead


def test_a_selection_is_needed_and_a_dry_run_changes_nothing(
    dead_of_three_keys: dict[str, uuid.UUID],
    pg_database: str,
    pg_engine: Engine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = dead_of_three_keys
    assert run_cli(["dead", "retry", "--reason", "x", *db_args(pg_database)]) == 2
    assert "which rows?" in capsys.readouterr().err
    args = ["dead", "skip", "--reason-contains", "INVALID json", "--dry-run"]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 dead rows would be skipped; nothing changed (--dry-run)"
    shown = [line.split()[:2] for line in lines[:-1]]
    assert shown == [[str(dead["case:1:7"]), "case:1:7"], [str(dead["case:1:8"]), "case:1:8"]]
    assert all("invalid JSON" in line for line in lines[:-1])
    assert run_cli(["dead", "retry", "--all", "--dry-run", *db_args(pg_database)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("3 dead rows would be retried")
    assert {state_of(pg_engine, event_id) for event_id in dead.values()} == {"dead"}
    assert audit(pg_engine) == []
    # list takes the same filters
    assert run_cli(["dead", "list", "--json", "--key", "case:1:9", *db_args(pg_database)]) == 0
    assert [row["key"] for row in json.loads(capsys.readouterr().out)] == ["case:1:9"]


def test_selections_combine_with_and_and_every_change_is_audited(
    dead_of_three_keys: dict[str, uuid.UUID],
    pg_database: str,
    pg_engine: Engine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = dead_of_three_keys
    # Both filters must match: case:1:9 is not invalid JSON, case:1:7 is not the key.
    args = ["dead", "skip", "--reason-contains", "invalid json", "--key", "case:1:8"]
    args += ["--key", "case:1:9", "--actor", "alice", "--reason", "test data"]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    out = capsys.readouterr().out
    assert f"{dead['case:1:8']} skipped (by alice: test data)" in out
    assert out.splitlines()[-1] == "1 dead row skipped"
    assert [state_of(pg_engine, dead[k]) for k in sorted(dead)] == ["dead", "skipped", "dead"]
    assert audit(pg_engine) == [(str(dead["case:1:8"]), "skip", "alice", "test data")]
    # An id the other filters do not match: nothing changes, all or nothing.
    args = ["dead", "skip", str(dead["case:1:7"]), str(dead["case:1:9"]), "--key", "case:1:7"]
    assert run_cli([*args, "--reason", "x", *db_args(pg_database)]) == 1
    assert "does not match the selection" in capsys.readouterr().err
    assert state_of(pg_engine, dead["case:1:7"]) == "dead"
    # --all: every dead row left, each with its audit record, in position order.
    args = ["dead", "skip", "--all", "--actor", "bob", "--reason", "cleanup"]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 dead rows skipped"
    assert audit(pg_engine)[1:] == [
        (str(dead["case:1:7"]), "skip", "bob", "cleanup"),
        (str(dead["case:1:9"]), "skip", "bob", "cleanup"),
    ]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    assert capsys.readouterr().out.splitlines() == ["0 dead rows skipped"]
    assert len(audit(pg_engine)) == 3


def positions(engine: Engine, key: str) -> list[tuple[uuid.UUID, int, str]]:
    E = table.event
    with engine.connect() as connection:
        rows = connection.execute(
            select(E.c.event_id, E.c.position, E.c.state)
            .where(E.c.ordering_key == key)
            .order_by(E.c.position)
        )
        return [(r.event_id, r.position, r.state) for r in rows]


def test_retrying_several_dead_rows_of_a_key_keeps_their_positions_and_order(
    pg_database: str,
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = insert_invalid_row(pg_engine, KEY)
    publish_events(pg_engine, 7, range(2, 3))
    third = insert_invalid_row(pg_engine, KEY)
    publish_events(pg_engine, 7, range(4, 5))
    assert drain(pg_engine, amqp_url, exchange_name) == 0  # the first holds the key
    # The relay holds a key at its first dead row, so a second dead row of one key
    # comes from elsewhere (an older relay, a hand edit): make it so directly.
    with pg_engine.begin() as connection:
        connection.execute(
            update(table.event)
            .where(table.event.c.event_id == third)
            .values(state=table.DEAD, last_error="invalid JSON: by hand")
        )
        for event_id, version in ((first, 1), (third, 3)):  # the fix
            connection.execute(
                update(table.event)
                .where(table.event.c.event_id == event_id)
                .values(payload=envelope_json(7, version))
            )
    before = positions(pg_engine, KEY)
    assert [state for _, _, state in before] == ["dead", "pending", "dead", "pending"]
    args = ["dead", "retry", "--key", KEY, "--actor", "carol", "--reason", "repaired"]
    assert run_cli([*args, *db_args(pg_database)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 dead rows back to pending"
    assert audit(pg_engine) == [
        (str(first), "retry", "carol", "repaired"),
        (str(third), "retry", "carol", "repaired"),
    ]
    assert drain(pg_engine, amqp_url, exchange_name) == 4
    messages = drain_queue(amqp_url, bound_queue, expected=4)
    assert versions_of(messages) == [1, 2, 3, 4]
    assert [m.properties["message_id"] for m in messages[::2]] == [str(first), str(third)]
    after = positions(pg_engine, KEY)
    assert [(i, p) for i, p, _ in after] == [(i, p) for i, p, _ in before]
    assert {state for _, _, state in after} == {"delivered"}
