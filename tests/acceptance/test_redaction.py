"""Secrets never reach logs, errors or output: passwords with any character, unencoded.

Unit properties of :mod:`outbox.redaction` (hypothesis-generated passwords in
every shape of secret setting), then the real CLI in every failure mode these
tests can provoke, in this process and as a subprocess writing JSON logs.

PostgreSQL here trusts every local connection (pg_hba.conf: ``trust``), so a
wrong database password cannot fail; authentication failures are provoked on
RabbitMQ only.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from outbox import redaction
from outbox.cli import settings as config
from outbox.cli.main import main
from outbox.errors import ConfigurationError
from outbox.ops.logformat import configure
from outbox.redaction import MASK, MIN_SECRET_LENGTH, redact
from outbox.store import engine as database
from tests.conftest import AMQP_URL
from tests.ops_support import free_port, publish_events
from tests.paths import ROOT

# Every printable ASCII character, and a few that are not ASCII.
ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F)) + "éß€日ü😀"
passwords = st.text(ALPHABET, min_size=MIN_SECRET_LENGTH, max_size=24)
SAFE = string.ascii_letters + string.digits


def libpq_quote(value: str) -> str:
    """A libpq keyword value, quoted: backslash and single quote escaped by a backslash."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Each shape of a secret setting: (setting, value with the password put in).
SHAPES: dict[str, tuple[str, Callable[[str], str]]] = {
    "amqp URL": ("broker_url", lambda pw: f"amqp://guest:{pw}@127.0.0.1:5672//"),
    "amqps URL, encoded": ("broker_url", lambda pw: f"amqps://relay:{quote(pw, safe='')}@mq//"),
    "postgresql URL": (
        "database_url",
        lambda pw: f"postgresql://app:{pw}@db.internal:5432/app?sslmode=require",
    ),
    "query parameter": (
        "database_url",
        lambda pw: f"postgresql://app@db:5432/app?sslmode=require&password={pw}",
    ),
    "libpq keywords": (
        "database_url",
        lambda pw: f"host=db port=5432 password={libpq_quote(pw)} dbname=app",
    ),
    "broker URL list": (
        "broker_url",
        lambda pw: f"amqp://guest:{pw}@mq1:5672//;amqp://other:{pw[::-1]}@mq2:5672//",
    ),
}


def forms(password: str) -> set[str]:
    """How a password may show: as is, percent-encoded, inside repr() and JSON."""
    shown = {password, quote(password, safe=""), repr(password)[1:-1]}
    shown.add(json.dumps(password)[1:-1])
    return {form for form in shown if len(form) >= MIN_SECRET_LENGTH}


def leaked(password: str, output: str) -> set[str]:
    return {form for form in forms(password) if form in output}


# -- the redaction function ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    shape=st.sampled_from(sorted(SHAPES)),
    password=passwords,
    before=st.text(ALPHABET, max_size=20),
    after=st.text(ALPHABET, max_size=20),
)
def test_a_registered_password_never_survives_redaction(
    shape: str, password: str, before: str, after: str
) -> None:
    redaction.clear_secrets()
    name, put = SHAPES[shape]
    config.resolve({name: put(password)}, "relay", environ={})

    def texts(pw: str) -> list[str]:
        value = put(pw)
        return [
            value,
            f"{before}{value}{after}",
            f"cannot reach broker {value}: login refused for {pw!r}",
            f"database URL {value!r} is not a SQLAlchemy URL",
            json.dumps({"url": value, "password": pw}),
            f"Port could not be cast to integer value as {pw!r}",
            f"{before} {quote(pw, safe='')} {after}",
        ]

    for text, masked in zip(texts(password), texts(MASK), strict=True):
        # Not a leak: the password is also in the text around it ("guest:guest").
        assume(not leaked(password, masked))
        assert not leaked(password, redact(text)), (text, redact(text))


@settings(max_examples=200, deadline=None)
@given(password=passwords)
def test_an_environment_file_or_flag_registers_the_password(password: str) -> None:
    redaction.clear_secrets()
    url = f"amqp://guest:{password}@127.0.0.1:5672//"
    assume(not leaked(password, "amqp://guest:***@127.0.0.1:5672//"))
    config.resolve({}, "relay", environ={"OUTBOX_BROKER_URL": url})
    assert not leaked(password, redact(f"retrying {url} in 1s"))


def test_patterns_hide_passwords_nobody_registered() -> None:
    redaction.clear_secrets()
    cases = {
        "amqp://guest:p@ss@mq:5672//": "amqp://guest:***@mq:5672//",
        "a amqp://u:x@y@h1//;amqp://v:z@h2// b": "a amqp://u:***@h1//;amqp://v:***@h2// b",
        "postgresql://app:hunter2@db/app?ssl=1": "postgresql://app:***@db/app?ssl=1",
        "host=db password='a b\\' c' dbname=app": "host=db password=*** dbname=app",
        "host=db password=s3cr3t dbname=app": "host=db password=*** dbname=app",
        "postgresql://db/app?password=x1&ssl=1": "postgresql://db/app?password=***&ssl=1",
        "redis://:tok@cache:6379/0": "redis://:***@cache:6379/0",
    }
    assert {text: redact(text) for text in cases} == cases


def test_short_secrets_are_not_registered_but_stay_hidden_in_urls() -> None:
    redaction.clear_secrets()
    config.resolve({"broker_url": "amqp://guest:abc@mq//"}, "relay", environ={})
    assert redaction.registered_secrets() == frozenset()
    assert redact("abc amqp://guest:abc@mq//") == "abc amqp://guest:***@mq//"


def test_a_user_name_is_shown_even_when_the_password_is_the_same() -> None:
    redaction.clear_secrets()
    config.resolve({"broker_url": "amqp://guest:guest@mq//"}, "relay", environ={})
    assert redact("cannot reach amqp://guest:guest@mq//") == "cannot reach amqp://guest:***@mq//"


def test_an_unparseable_value_is_a_secret_as_a_whole() -> None:
    redaction.clear_secrets()
    config.resolve({"database_url": "hunter2-not-a-url"}, "relay", environ={})
    assert redact("got hunter2-not-a-url") == f"got {MASK}"


def test_the_registry_can_be_emptied_and_database_redact_is_the_same_function() -> None:
    redaction.register_secret("s3cr3t-value")
    assert redact("s3cr3t-value") == MASK
    redaction.clear_secrets()
    assert redact("s3cr3t-value") == "s3cr3t-value"
    assert database.redact is redaction.redact


@pytest.mark.parametrize("special", ["/", "?", "#", "@", " ", "%zz", ":"])
def test_url_errors_never_echo_what_follows_user_and_colon(special: str) -> None:
    redaction.clear_secrets()
    password = f"pa{special}ssword1"
    url = f"postgresql://app:{password}@127.0.0.1:notaport/db"
    with pytest.raises(ConfigurationError) as caught:
        database.normalize_url(url)
    assert "database URL 'postgresql://app:***@…' is not a SQLAlchemy URL" in str(caught.value)
    assert "ssword1" not in str(caught.value)


def test_a_libpq_keyword_dsn_is_refused_with_its_password_hidden() -> None:
    redaction.clear_secrets()
    with pytest.raises(ConfigurationError) as caught:
        database.normalize_url("host=db password=s3cr3t dbname=app")
    message = str(caught.value)
    assert "'host=db password=*** dbname=app'" in message
    assert "keyword DSNs are not accepted" in message and "s3cr3t" not in message


def test_a_parser_error_quoting_a_piece_of_the_password_is_hidden() -> None:
    redaction.clear_secrets()
    url = "amqp://guest:ab:cd/secret@127.0.0.1:5672//"
    message = redaction.redact_error("Port could not be cast to integer value as 'ab:cd'", url)
    assert message == "Port could not be cast to integer value as '***'"
    assert redaction.describe_url(url) == "amqp://guest:***@…"


# -- log output ----------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_third_party_records_are_json_redacted_and_warnings_only(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    redaction.clear_secrets()
    config.resolve({"broker_url": "amqp://guest:pa ss@word@mq//"}, "relay", environ={})
    configure("json", "INFO")
    logging.getLogger("apscheduler.scheduler").info("Added job %r", "backlog")  # noise: dropped
    logging.getLogger("outbox.test").info("relay record")
    for name in ("kombu.connection", "amqp", "sqlalchemy.pool", "psycopg"):
        logging.getLogger(name).warning("retrying amqp://guest:pa ss@word@mq// (pa ss@word)")
    captured = capsys.readouterr()
    assert captured.out == ""  # logs go to stderr: stdout is for a command's output
    out = json_lines(captured.err)
    assert [(r["logger"], r["event"], r["level"]) for r in out] == [
        ("outbox.test", "log", "info"),
        ("kombu.connection", "log", "warning"),
        ("amqp", "log", "warning"),
        ("sqlalchemy.pool", "log", "warning"),
        ("psycopg", "log", "warning"),
    ]
    assert all("pa ss" not in r["message"] for r in out)


def test_an_uncaught_thread_exception_is_one_json_record_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    redaction.clear_secrets()
    config.resolve({"broker_url": "amqp://guest:thread-s3cret@mq//"}, "relay", environ={})
    configure("json", "INFO")

    def fail() -> None:
        raise RuntimeError("cannot reach amqp://guest:thread-s3cret@mq//")

    thread = threading.Thread(target=fail, name="outbox-test-thread")
    thread.start()
    thread.join()
    captured = capsys.readouterr()
    (record,) = json_lines(captured.err)  # every line JSON: no raw traceback
    assert (record["event"], record["level"], record["thread"]) == (
        "thread_exception",
        "error",
        "outbox-test-thread",
    )
    assert "RuntimeError" in record["exception"]
    assert "thread-s3cret" not in captured.err


def test_a_missed_scheduler_job_is_a_json_warning_with_an_event_name(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    configure("json", "INFO")
    scheduler = BackgroundScheduler(daemon=True)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    scheduler.add_job(lambda: None, "date", run_date=past, misfire_grace_time=1, id="late")
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        seen = ""
        while "scheduler_job_missed" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += capsys.readouterr().err
    finally:
        scheduler.shutdown(wait=True)
    seen += capsys.readouterr().err
    (missed,) = [r for r in json_lines(seen) if r["event"] == "scheduler_job_missed"]
    assert missed["level"] == "warning" and missed["logger"].startswith("apscheduler")
    assert "was missed by" in missed["message"]


# -- the CLI, in this process -------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*args, "--log-format", "json"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def special_password(special: str) -> st.SearchStrategy[str]:
    """A password with ``special`` unencoded in it, around safe characters."""
    safe = st.text(SAFE, min_size=3, max_size=8)
    return st.builds(lambda a, b: f"{a}{special}{b}", safe, safe)


IN_PROCESS = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@IN_PROCESS
@given(data=st.data())
@pytest.mark.parametrize("special", ["/", "?", "@", " ", "#", "%", "&", ":"])
def test_cli_database_url_errors_show_no_password(
    special: str, data: st.DataObject, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    password = data.draw(special_password(special))
    port = free_port()
    unparseable = f"postgresql://app:{password}@127.0.0.1:notaport/db"
    refused = f"postgresql://app:{password}@127.0.0.1:{port}/db"
    for url, expected_code in ((unparseable, 2), (refused, None)):
        code, output = cli(capsys, "relay", "--database-url", url, "--broker-url", AMQP_URL)
        assert code != 0 and (expected_code is None or code == expected_code), output
        assert not leaked(password, output), output
        assert "Traceback" not in output


def test_cli_refuses_a_keyword_dsn_without_showing_its_password(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    dsn = "host=127.0.0.1 password='a b\\' c-s3cr3t' dbname=app"
    code, output = cli(capsys, "status", "--database-url", dsn)
    assert code == 2 and "keyword DSNs are not accepted" in output
    assert "s3cr3t" not in output


@settings(IN_PROCESS, max_examples=2)  # kombu waits 2 s before its one retry
@given(data=st.data())
@pytest.mark.parametrize(
    "failure",
    ["unparseable", "refused", "authentication", "tls", "authentication, unencoded"],
)
def test_cli_check_broker_failures_show_no_password(
    failure: str,
    data: st.DataObject,
    pg_url_fixture: str,
    amqp_url: str,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    special = {"unparseable": "/", "authentication, unencoded": "@"}.get(failure, " ")
    password = data.draw(special_password(special))
    url = {
        "refused": f"amqp://guest:{password}@127.0.0.1:{free_port()}//",
        "tls": f"amqps://guest:{password}@127.0.0.1:5672//",
    }.get(failure, f"amqp://guest:{password}@127.0.0.1:5672//")
    code, output = cli(capsys, "check", "--database-url", pg_url_fixture, "--broker-url", url)
    assert code == 1, output
    assert "FAIL  broker" in output, output
    assert not leaked(password, output), output
    assert "Traceback" not in output


# -- the relay, as a subprocess writing JSON logs -------------------------------------

PASSWORD = "Pw@1 /?#%&:;'\"\\ü-" + "".join(sorted(set(string.punctuation)))


def relay_env(database_url: str, broker_url: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    clean.update(
        OUTBOX_LOG_FORMAT="json",
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_BROKER_URL=broker_url,
        OUTBOX_EXCHANGE="outbox-test-redaction",
        OUTBOX_POLL_INTERVAL="0.2",
    )
    return clean


def run_relay_until(
    env: dict[str, str], done: Callable[[str], bool], timeout: float = 20
) -> tuple[int, str, str]:
    """``python -m outbox.cli relay``: stopped (SIGTERM) once ``done(stderr so far)``."""
    out, err = io.StringIO(), io.StringIO()
    with subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "relay"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        readers = [
            threading.Thread(target=lambda: out.writelines(process.stdout or ()), daemon=True),
            threading.Thread(target=lambda: err.writelines(process.stderr or ()), daemon=True),
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None and not done(err.getvalue()):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for reader in readers:
                reader.join(timeout=5)
    return process.returncode, out.getvalue(), err.getvalue()


def broker_unavailable(logs: str) -> bool:
    return '"event": "relay_broker_unavailable"' in logs


def test_relay_subprocess_logs_json_without_the_password_in_every_failure_mode(
    pg_engine: Engine, pg_url_fixture: str, amqp_url: str
) -> None:
    publish_events(pg_engine, 1, range(1, 2))  # something to send: the relay connects
    closed = free_port()
    cases: dict[str, tuple[str, str, int | None]] = {
        # name: database URL, broker URL, exit code (None: still running, stopped by us)
        "broker URL unparseable": (pg_url_fixture, f"amqp://guest:s3/{PASSWORD}@127.0.0.1//", 2),
        "broker refused": (
            pg_url_fixture,
            f"amqp://guest:{quote(PASSWORD, safe='')}@127.0.0.1:{closed}//",
            None,
        ),
        "broker authentication": (
            pg_url_fixture,
            f"amqp://guest:{quote(PASSWORD, safe='')}@127.0.0.1:5672//",
            None,
        ),
        "broker authentication, unencoded @ and space": (
            pg_url_fixture,
            "amqp://guest:s3cr3t p@ss w0rd@127.0.0.1:5672//",
            None,
        ),
        "broker TLS to a plain port": (
            pg_url_fixture,
            f"amqps://guest:{quote(PASSWORD, safe='')}@127.0.0.1:5672//",
            None,
        ),
        "database URL unparseable": (
            "postgresql://app:s3cr3t p@ss w0rd@127.0.0.1:notaport/db",
            amqp_url,
            2,
        ),
        "database URL misparsed": (  # SQLAlchemy takes "1 " for the host
            f"postgresql://app:{PASSWORD}@127.0.0.1:notaport/db",
            amqp_url,
            1,
        ),
        "database refused": (
            f"postgresql://app:s3cr3t p@ss w0rd@127.0.0.1:{closed}/db",
            amqp_url,
            1,
        ),
        "database keyword DSN": (f"host=127.0.0.1 password={libpq_quote(PASSWORD)}", amqp_url, 2),
    }
    results: dict[str, tuple[int, str, str]] = {}

    def run(name: str, database_url: str, broker_url: str) -> None:
        results[name] = run_relay_until(relay_env(database_url, broker_url), broker_unavailable)

    threads = [
        threading.Thread(target=run, args=(name, db, broker), daemon=True)
        for name, (db, broker, _) in cases.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    problems: dict[str, list[str]] = {}
    for name, (_, _, expected) in cases.items():
        code, stdout, stderr = results[name]
        found = []
        if expected is None and (code != 0 or not broker_unavailable(stderr)):
            found.append(f"not retried and stopped cleanly (exit {code})")
        if expected is not None and code != expected:
            found.append(f"exit code {code}, not {expected}")
        if stdout:
            found.append(f"output on stdout, which is not for logs: {stdout!r}")
        # Logs are JSON records on stderr; a fatal error ends them with one 'outbox: ' line.
        *records, last = stderr.splitlines() or [""]
        if last.startswith("outbox: "):
            last = "{}"
        for line in [*records, last]:
            try:
                json.loads(line)
            except ValueError:
                found.append(f"not a JSON record on stderr: {line!r}")
        for password in (PASSWORD, "s3/" + PASSWORD, "s3cr3t p@ss w0rd"):
            if leaked(password, stdout + stderr):
                found.append(f"the password in {stdout + stderr!r}")
        if "p@ss w0rd" in stdout + stderr or "Traceback" in stderr:
            found.append(f"a piece of the password or a traceback: {stdout + stderr!r}")
        if found:
            problems[name] = found
    assert problems == {}


def test_the_security_page_states_the_minimum_length() -> None:
    page = (ROOT / "docs" / "security.md").read_text("utf-8")
    assert f"Secrets shorter than {MIN_SECRET_LENGTH} characters are not registered" in page
