"""``outbox check --queue``: a queue's type told over AMQP alone, leaving the queue as it was.

Against the real broker: each queue is declared here with the arguments a
user might give it, probed, and then declared again with exactly those
arguments, which the broker accepts only if the probe changed none of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox.ops.queue_type import CLASSIC, QUORUM, STREAM, queue_type
from tests.conftest import pg_url
from tests.ops_support import run_cli


@pytest.fixture
def connection(amqp_url: str) -> Iterator[kombu.Connection]:
    with kombu.Connection(amqp_url) as conn:
        conn.connect()
        yield conn


@pytest.fixture
def declared(connection: kombu.Connection) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        connection.channel().queue_delete(name)


def declare(
    connection: kombu.Connection,
    names: list[str],
    arguments: dict[str, Any],
    *,
    durable: bool = True,
) -> str:
    name = f"outbox-test-probe-{uuid.uuid4().hex[:10]}"
    connection.channel().queue_declare(
        name, durable=durable, auto_delete=False, arguments=arguments
    )
    names.append(name)
    return name


def unchanged(
    connection: kombu.Connection, name: str, arguments: dict[str, Any], durable: bool = True
) -> bool:
    """The broker accepts the original declare again: no argument of the queue changed."""
    try:
        connection.channel().queue_declare(
            name, durable=durable, auto_delete=False, arguments=arguments
        )
    except Exception:
        return False
    return True


SHAPES: list[tuple[str, dict[str, Any], bool, str]] = [
    ("classic", {}, True, CLASSIC),
    ("classic, said so", {"x-queue-type": "classic"}, True, CLASSIC),
    (
        "classic with limits and a dead-letter exchange named with a quote",
        {
            "x-max-length": 10,
            "x-overflow": "reject-publish",
            "x-message-ttl": 60_000,
            "x-dead-letter-exchange": "dlx 'quoted'",
        },
        True,
        CLASSIC,
    ),
    ("classic, not durable", {}, False, CLASSIC),
    ("quorum", {"x-queue-type": "quorum"}, True, QUORUM),
    (
        "quorum with a delivery limit and reject-publish",
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": 5,
            "x-max-length": 100,
            "x-overflow": "reject-publish",
            "x-dead-letter-exchange": "dlx",
        },
        True,
        QUORUM,
    ),
    ("stream", {"x-queue-type": "stream", "x-max-length-bytes": 20_000_000}, True, STREAM),
]


@pytest.mark.parametrize(
    ("shape", "arguments", "durable", "kind"), SHAPES, ids=[s[0] for s in SHAPES]
)
def test_each_queue_type_is_told_and_the_queue_left_as_it_was(
    connection: kombu.Connection,
    declared: list[str],
    shape: str,
    arguments: dict[str, Any],
    durable: bool,
    kind: str,
) -> None:
    name = declare(connection, declared, arguments, durable=durable)
    found = queue_type(connection, name)
    assert found.exists and found.kind == kind, (shape, found)
    assert found.durable is durable
    assert unchanged(connection, name, arguments, durable)


CLASSIC_ARGUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "x-max-length": st.integers(1, 2**31 - 1),
        "x-max-length-bytes": st.integers(1, 2**31 - 1),
        "x-message-ttl": st.integers(0, 2**31 - 1),
        "x-expires": st.integers(60_000, 2**31 - 1),
        "x-overflow": st.sampled_from(["drop-head", "reject-publish", "reject-publish-dlx"]),
        "x-dead-letter-exchange": st.text(
            st.characters(min_codepoint=32, max_codepoint=126), max_size=30
        ),
        "x-max-priority": st.integers(1, 255),
        "x-queue-mode": st.sampled_from(["default", "lazy"]),
    },
)
QUORUM_ARGUMENTS = st.fixed_dictionaries(
    {"x-queue-type": st.just("quorum")},
    optional={
        "x-max-length": st.integers(1, 2**31 - 1),
        "x-delivery-limit": st.integers(1, 1000),
        "x-overflow": st.sampled_from(["drop-head", "reject-publish"]),
        "x-dead-letter-exchange": st.text(
            st.characters(min_codepoint=32, max_codepoint=126), max_size=30
        ),
        "x-quorum-initial-group-size": st.integers(1, 3),
    },
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(CLASSIC_ARGUMENTS, QUORUM_ARGUMENTS))
def test_any_arguments_leave_the_type_told_and_the_queue_unchanged(
    connection: kombu.Connection, declared: list[str], arguments: dict[str, Any]
) -> None:
    name = declare(connection, declared, arguments)
    found = queue_type(connection, name)
    expected = QUORUM if arguments.get("x-queue-type") == QUORUM else CLASSIC
    assert found.kind == expected, (arguments, found)
    assert unchanged(connection, name, arguments)


def test_a_missing_queue_is_reported_and_not_created(connection: kombu.Connection) -> None:
    name = f"outbox-test-missing-{uuid.uuid4().hex[:10]}"
    found = queue_type(connection, name)
    assert not found.exists
    with pytest.raises(Exception, match="404"):
        connection.channel().queue_declare(name, passive=True)


def test_check_passes_quorum_warns_classic_and_fails_missing(
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    connection: kombu.Connection,
    declared: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    quorum = declare(connection, declared, {"x-queue-type": "quorum"})
    classic = declare(connection, declared, {})
    missing = f"outbox-test-missing-{uuid.uuid4().hex[:10]}"
    base = ["check", "--database-url", pg_url(pg_database), "--broker-url", amqp_url]
    base += ["--exchange", exchange_name]

    code = run_cli([*base, "--queue", quorum, "--queue", classic])
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.startswith(("PASS  queue", "WARN  queue"))
    }
    assert code == 0, out
    assert f"'{quorum}' is a quorum queue" in lines["PASS"]
    assert f"'{classic}' is a classic queue" in lines["WARN"]
    assert "x-queue-type: quorum" in out.split(lines["WARN"])[1]  # its fix
    assert "all checks passed (1 warning)" in out

    code = run_cli([*base, "--queue", missing])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"FAIL  queue        queue '{missing}' does not exist" in out
    assert "guest:guest" not in out
