from __future__ import annotations

import uuid

import kombu
import psycopg
import pytest
from sqlalchemy import make_url

from tests.conftest import pg_url
from tests.ops_support import closed_port_url, run_cli


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str], str]:
    code = run_cli(["check", *args])
    out = capsys.readouterr().out
    statuses = {
        line.split()[1]: line.split()[0]
        for line in out.splitlines()
        if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP")
    }
    return code, statuses, out


def test_everything_in_place_passes(
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, statuses, out = check(
        capsys,
        "--database-url",
        pg_url(pg_database),
        "--broker-url",
        amqp_url,
        "--exchange",
        exchange_name,
    )
    assert statuses == dict.fromkeys(
        ("database", "migrations", "permissions", "broker", "exchange"), "PASS"
    ), out
    assert code == 0
    assert "all checks passed" in out
    assert "guest:guest" not in out


def test_each_failure_has_a_fix_and_fails_the_exit_code(
    empty_pg_database: str, amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, statuses, out = check(
        capsys,
        "--database-url",
        pg_url(empty_pg_database),
        "--broker-url",
        closed_port_url(),
        "--exchange",
        f"outbox-test-missing-{uuid.uuid4().hex[:8]}",
    )
    assert code == 1
    assert statuses == {
        "database": "PASS",
        "migrations": "FAIL",
        "permissions": "FAIL",
        "broker": "FAIL",
        "exchange": "SKIP",
    }, out
    assert out.count("fix: ") == 3
    assert "run `outbox migrate`" in out
    assert "guest:***@" in out and "guest:guest" not in out


def test_missing_exchange_and_unreachable_database(
    amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"outbox-test-missing-{uuid.uuid4().hex[:8]}"
    closed = closed_port_url().split(":")[-1].rstrip("/")
    code, statuses, out = check(
        capsys,
        "--database-url",
        f"postgresql://app:pw-secret@127.0.0.1:{closed}/app",
        "--broker-url",
        amqp_url,
        "--exchange",
        missing,
    )
    assert code == 1
    assert statuses == {
        "database": "FAIL",
        "migrations": "SKIP",
        "permissions": "SKIP",
        "broker": "PASS",
        "exchange": "FAIL",
    }, out
    assert f"declare a durable topic exchange {missing!r}" in out
    assert "pw-secret" not in out


def test_missing_privileges_are_named(
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    role = f"outbox_check_{uuid.uuid4().hex[:8]}"
    owner_url = pg_url(pg_database)
    with psycopg.connect(owner_url, autocommit=True) as connection:
        connection.execute(f'CREATE ROLE "{role}" LOGIN')
        connection.execute(f'GRANT SELECT ON outbox_event, outbox_partition TO "{role}"')
        connection.execute(f'GRANT SELECT ON outbox_alembic_version TO "{role}"')
    try:
        role_url = make_url(owner_url).set(username=role).render_as_string(hide_password=False)
        code, statuses, out = check(
            capsys,
            "--database-url",
            role_url,
            "--broker-url",
            amqp_url,
            "--exchange",
            exchange_name,
        )
    finally:
        with psycopg.connect(owner_url, autocommit=True) as connection:
            connection.execute(f'DROP OWNED BY "{role}"')
            connection.execute(f'DROP ROLE "{role}"')
    assert code == 1
    assert statuses["permissions"] == "FAIL", out
    assert statuses["migrations"] == "PASS", out
    assert "UPDATE on outbox_event" in out and "DELETE on outbox_event" in out
    assert "SELECT on outbox_event" not in out
    assert f"outbox grant-relay-role {role}" in out
