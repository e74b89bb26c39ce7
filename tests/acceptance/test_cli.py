"""The ``outbox`` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import kombu
from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session

import outbox
from outbox.cli.main import EXIT_BROKEN_PIPE
from outbox.relay.message import type_namespace
from outbox.store import table
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue, pg_url

OUTBOX = str(Path(sys.executable).parent / "outbox")
SCHEMA = "https://example.org/schemas/case.json"
SECRET = "s3cretpw"


def env(**settings: str) -> dict[str, str]:
    """The test process's environment without any OUTBOX_* setting, plus ``settings``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    clean.update({"OUTBOX_LOG_FORMAT": "json", **settings})
    return clean


def run(*args: str, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTBOX, *args], env=env(**settings), capture_output=True, text=True, timeout=timeout
    )


def with_password(url: str) -> str:
    """The same URL with a password (PostgreSQL here trusts local users, so it is ignored)."""
    return url.replace("postgres@", f"postgres:{SECRET}@")


def publish_cases(engine: Engine, *ids: int, version: int = 1) -> None:
    with Session(engine) as session, session.begin():
        for case_id in ids:
            outbox.publish(
                session,
                outbox.Envelope(
                    action="update",
                    schema=SCHEMA,
                    content={"tenantId": 1, "id": case_id, "version": version},
                ),
            )


def test_migrate_creates_the_tables(empty_pg_database: str) -> None:
    url = with_password(pg_url(empty_pg_database))

    result = run("migrate", OUTBOX_DATABASE_URL=url)

    assert result.returncode == 0, result.stderr
    assert "outbox_0003" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    engine = create_outbox_engine(url)
    try:
        assert set(table.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    # Migrating again is a no-op that still succeeds.
    assert run("migrate", "--database-url", url).returncode == 0


def test_status_json(pg_engine: Engine, pg_url_fixture: str) -> None:
    empty = run("status", "--json", "--database-url", pg_url_fixture)
    assert empty.returncode == 0, empty.stderr
    report = json.loads(empty.stdout)
    assert (report["pending"], report["delivered"], report["dead"]) == (0, 0, 0)
    assert report["oldest_pending_age_seconds"] is None

    publish_cases(pg_engine, 1, 2, 3)
    store = SqlStore(pg_engine)
    store.mark_delivered(
        [store.fetch_pending(list(range(table.DEFAULT_PARTITIONS)), 1)[0].position]
    )

    result = run("status", "--json", OUTBOX_DATABASE_URL=pg_url_fixture)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["pending"], report["delivered"], report["dead"]) == (2, 1, 0)
    assert isinstance(report["oldest_pending_age_seconds"], float)
    assert 0 < report["oldest_pending_age_seconds"] < 60


def test_relay_forwards_events_and_stops_on_sigterm(
    pg_engine: Engine,
    pg_url_fixture: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
) -> None:
    publish_cases(pg_engine, 1, 2, version=1)
    process = subprocess.Popen(
        [OUTBOX, "relay", "--poll-interval", "0.2"],
        env=env(
            OUTBOX_DATABASE_URL=with_password(pg_url_fixture),
            OUTBOX_BROKER_URL=amqp_url,
            OUTBOX_EXCHANGE=exchange_name,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = drain_queue(amqp_url, bound_queue, expected=2, timeout=20)
        publish_cases(pg_engine, 1, 2, version=2)  # written while the relay runs
        second = drain_queue(amqp_url, bound_queue, expected=2, timeout=20)
        deadline = time.monotonic() + 10
        while SqlStore(pg_engine).counts()["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert SqlStore(pg_engine).counts()["delivered"] == 4
    finally:
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert time.monotonic() - started < 8  # "within a few seconds", with room for a busy CI host
    assert [json.loads(m.body)["resource"]["content"]["version"] for m in first + second] == [
        1,
        1,
        2,
        2,
    ]
    # By default the CloudEvents attributes name the producer: its database, the schema's owner.
    database = pg_url_fixture.rsplit("/", 1)[1]
    assert {m.headers["ce-source"] for m in first + second} == {f"/{database}"}
    headers = first[0].headers
    namespace = type_namespace(headers["outbox-schema"])
    assert namespace  # the test's schema URI has a host
    assert (
        headers["ce-type"]
        == f"{namespace}{headers['outbox-resource-type']}.{headers['outbox-action']}"
    )
    # JSON log records go to stderr, one per line; stdout stays for command output.
    assert stdout == ""
    events = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert "relay_started" in events and "relay_stopped" in events
    assert SECRET not in stdout + stderr
    assert "Traceback" not in stderr


def one_line_error_problems(result: subprocess.CompletedProcess[str], *expected: str) -> list[str]:
    """What is wrong with an error's output (empty when it is one clean line)."""
    problems = []
    output = result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        problems.append("exit code 0")
    if "Traceback" in output:
        problems.append("a traceback")
    if SECRET in output:
        problems.append("the password")
    if len(lines) != 1 or not lines[0].startswith("outbox: "):
        problems.append(f"not one 'outbox: ' line: {result.stderr!r}")
    problems += [f"no {text!r} in {result.stderr!r}" for text in expected if text not in output]
    return problems


def test_configuration_and_connection_errors_are_one_line_without_secrets(
    pg_url_fixture: str, empty_pg_database: str, amqp_url: str
) -> None:
    unreachable = f"postgresql://postgres:{SECRET}@127.0.0.1:1/outbox"
    unmigrated = with_password(pg_url(empty_pg_database))
    migrated = with_password(pg_url_fixture)
    cases: list[tuple[str, str, str, str]] = [
        # command, database URL, broker URL, expected text. Each case is an interpreter
        # start-up (about a CPU second), so every error path is covered once.
        (
            "status",
            f"postgresql://postgres:{SECRET}@127.0.0.1:notaport/db",
            amqp_url,
            "database URL",
        ),
        ("migrate", f"nosuchdialect://postgres:{SECRET}@127.0.0.1/db", amqp_url, "database URL"),
        ("relay", "not a url at all", amqp_url, "database URL"),
        ("migrate", unreachable, amqp_url, "port 1"),
        ("relay", unreachable, amqp_url, "port 1"),
        ("relay", unmigrated, amqp_url, "outbox migrate"),
        ("relay", migrated, f"nosuchtransport://guest:{SECRET}@127.0.0.1//", "broker URL"),
    ]
    # Started together: each is a fresh interpreter, and they are independent.
    processes = [
        subprocess.Popen(
            [OUTBOX, command],
            env=env(OUTBOX_DATABASE_URL=database, OUTBOX_BROKER_URL=broker),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, database, broker, _ in cases
    ]
    problems = {}
    for (command, database, broker, expected), process in zip(cases, processes, strict=True):
        stdout, stderr = process.communicate(timeout=60)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if found := one_line_error_problems(result, expected):
            problems[f"{command} {database} {broker}"] = found
    assert problems == {}


def test_unreachable_broker_is_reported_in_one_line_and_retried(
    pg_engine: Engine, pg_url_fixture: str
) -> None:
    """A relay keeps running while the broker is away (it comes back); it says why, briefly."""
    publish_cases(pg_engine, 1)
    process = subprocess.Popen(
        [OUTBOX, "relay", "--log-format", "json"],
        env=env(
            OUTBOX_DATABASE_URL=pg_url_fixture,
            OUTBOX_BROKER_URL=f"amqp://guest:{SECRET}@127.0.0.1:1//",
            OUTBOX_EXCHANGE="outbox-unreachable",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any("cannot reach broker" in line for line in lines):
            assert time.monotonic() < deadline, f"no broker error reported: {lines}"
            assert process.poll() is None, "the relay exited"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        reader.join(timeout=5)
        stdout = process.stdout.read() if process.stdout else ""
        process.__exit__(None, None, None)  # closes the pipes
    stderr = "".join(lines)
    assert process.returncode == 0
    assert stdout == ""
    records = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON record
    unreachable = [r for r in records if "cannot reach broker" in r["message"]]
    assert unreachable, stderr
    assert "127.0.0.1:1" in unreachable[0]["message"]
    assert SECRET not in stdout + stderr
    assert "Traceback" not in stderr
    assert SqlStore(pg_engine).counts()["pending"] == 1  # nothing marked without a confirm


def test_demo_runs_without_servers(tmp_path: Path) -> None:
    result = subprocess.run(
        [OUTBOX, "demo"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(messages) == 7  # 5 creates, 1 update, 1 delete; the rolled-back one is absent
    assert "consumed  7 messages" in result.stdout
    per_resource: dict[int, list[str]] = defaultdict(list)
    for message in messages:
        body = message["body"]
        per_resource[body["resource"]["content"]["id"]].append(body["action"])
        assert message["routing_key"] == f"case.{body['action']}"
    first, *_, last = sorted(per_resource)
    assert per_resource[first] == ["create", "update"]
    assert per_resource[last] == ["create", "delete"]
    assert all(per_resource[i] == ["create"] for i in per_resource if i not in (first, last))
    assert (tmp_path / "outbox-demo" / "outbox.db").exists()


# -- stdout: the command's output, alone, to a reader that may leave early ---------


def test_stdout_holds_only_the_command_output(pg_url_fixture: str, tmp_path: Path) -> None:
    """Log records go to stderr (`schemas register` once printed one to stdout)."""
    uri = "https://example.org/schemas/stdout-case.json"
    schema = tmp_path / "case.json"
    schema.write_text(json.dumps({"$id": uri, "type": "object"}))
    settings = {"OUTBOX_DATABASE_URL": pg_url_fixture, "OUTBOX_LOG_LEVEL": "INFO"}

    registered = run("schemas", "register", str(schema), **settings)
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout == f"registered {uri} version 1 (jsonschema)\n"
    records = [json.loads(line) for line in registered.stderr.splitlines()]
    assert [r["event"] for r in records] == ["schema_registered"]  # logged, on stderr

    for args, shape in (
        (("status", "--json"), dict),
        (("dead", "list", "--json"), list),
        (("schemas", "list", "--json"), list),
    ):
        result = run(*args, **settings)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == 1, result.stdout
        assert isinstance(json.loads(result.stdout), shape), result.stdout


def broken_pipe_problems(process: subprocess.Popen[str]) -> list[str]:
    """What is wrong with how a command ended after its reader left (empty when quiet)."""
    _, stderr = process.communicate(timeout=60)
    problems = []
    if process.returncode not in (0, EXIT_BROKEN_PIPE):
        problems.append(f"exit status {process.returncode}")
    if any(text in stderr for text in ("Traceback", "Exception ignored", "BrokenPipe")):
        problems.append(f"stderr: {stderr!r}")
    return problems


def test_check_piped_into_head_exits_quietly(
    pg_url_fixture: str, amqp_url: str, exchange_name: str
) -> None:
    """`outbox check | head -1`: the reader closes its end after the first line."""
    process = subprocess.Popen(
        [OUTBOX, "check"],
        env=env(
            OUTBOX_DATABASE_URL=pg_url_fixture,
            OUTBOX_BROKER_URL=amqp_url,
            OUTBOX_EXCHANGE=exchange_name,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    process.stdout.close()  # as head does: later lines meet a pipe nobody reads
    assert first.startswith("PASS  database"), first
    assert broken_pipe_problems(process) == []
    assert process.returncode == EXIT_BROKEN_PIPE  # check writes on after its first line


def test_every_command_exits_quietly_when_stdout_is_closed(
    pg_url_fixture: str, amqp_url: str, exchange_name: str, tmp_path: Path
) -> None:
    """Each command that writes to stdout, on a pipe whose reader has already gone."""
    schema = tmp_path / "case.json"
    schema.write_text(json.dumps({"$id": "https://example.org/schemas/pipe.json"}))
    commands = [
        ["--help"],
        ["migrate"],
        ["status"],
        ["status", "--json"],
        ["check"],
        ["schemas", "register", str(schema)],
        ["schemas", "list"],
        ["dead", "list"],
        ["dead", "list", "--json"],
        ["replay", "--since", "1h", "--dry-run"],
        ["drain", "--timeout", "5"],
        ["grant-relay-role", "outbox_relay", "--print"],
        ["config-reference"],
        ["demo", "--directory", str(tmp_path / "demo")],
    ]
    settings = env(
        OUTBOX_DATABASE_URL=pg_url_fixture,
        OUTBOX_BROKER_URL=amqp_url,
        OUTBOX_EXCHANGE=exchange_name,
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        processes = [
            subprocess.Popen(
                [OUTBOX, *args],
                env=settings,
                cwd=tmp_path,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in commands
        ]
    finally:
        os.close(write_end)
    problems = {
        " ".join(args): found
        for args, process in zip(commands, processes, strict=True)
        if (found := broken_pipe_problems(process))
    }
    assert problems == {}
