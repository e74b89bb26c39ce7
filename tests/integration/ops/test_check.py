from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import kombu
import psycopg
import pytest
from sqlalchemy import make_url

from outbox.errors import BrokerUnavailable
from outbox.relay.publisher import open_publisher
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
    amqp_url: str, exchange_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = closed_port_url().split(":")[-1].rstrip("/")
    code, statuses, out = check(
        capsys,
        "--database-url",
        f"postgresql://app:pw-secret@127.0.0.1:{closed}/app",
        "--broker-url",
        amqp_url,
        "--exchange",
        exchange_name,  # missing; guest may configure it, so it is declared as the relay would
    )
    assert code == 1
    assert statuses == {
        "database": "FAIL",
        "migrations": "SKIP",
        "permissions": "SKIP",
        "broker": "PASS",
        "exchange": "PASS",
    }, out
    assert f"exchange {exchange_name!r} was missing: declared it" in out
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


# -- the exchange: the relay's declare, and who may make it ---------------------------


@dataclass(frozen=True)
class Broker:
    """A throwaway virtual host and its users (see the ``broker`` fixture)."""

    host: str
    vhost: str
    users: dict[str, str]  # role -> user name; every password is PASSWORD

    def url(self, role: str) -> str:
        return f"amqp://{self.users[role]}:{PASSWORD}@{self.host}/{self.vhost}"

    def exchanges(self) -> dict[str, tuple[str, str]]:
        """name -> (type, durable) of the virtual host's exchanges, as RabbitMQ lists them."""
        listed = rabbitmqctl(
            "list_exchanges", "--no-table-headers", "-p", self.vhost, "name", "type", "durable"
        )
        rows = [line.split("\t") for line in listed.splitlines() if line.strip()]
        return {row[0]: (row[1], row[2]) for row in rows if len(row) == 3}


PASSWORD = "check-pw-secret"


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def broker(amqp_url: str) -> Iterator[Broker]:
    """A virtual host of its own, with an admin (``admin``), a user that may configure
    every exchange (``configurer``, as the relay's user should be) and one that may
    write and read but configure nothing (``restricted``); all deleted after the tests
    of this module (rabbitmqctl takes half a second a call). Tests name their own
    exchanges."""
    reason = "rabbitmqctl is not installed"
    if shutil.which("rabbitmqctl") is not None:
        status = subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60)
        reason = status.stderr.decode(errors="replace").strip() if status.returncode else ""
    if reason:
        message = f"rabbitmqctl cannot manage the local RabbitMQ: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = uuid.uuid4().hex[:8]
    connection = kombu.Connection(amqp_url)
    broker = Broker(
        host=f"{connection.hostname}:{connection.port or 5672}",
        vhost=f"outbox-check-{tag}",
        users={
            role: f"outbox-check-{role}-{tag}" for role in ("admin", "configurer", "restricted")
        },
    )
    permissions = {"admin": ".*", "configurer": ".*", "restricted": "^$"}  # configure patterns
    rabbitmqctl("add_vhost", broker.vhost)
    try:
        for role, user in broker.users.items():
            rabbitmqctl("add_user", user, PASSWORD)
            rabbitmqctl("set_permissions", "-p", broker.vhost, user, permissions[role], ".*", ".*")
        yield broker
    finally:
        rabbitmqctl("delete_vhost", broker.vhost)
        for user in broker.users.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)


def declare_as_admin(broker: Broker, name: str, kind: str) -> None:
    with kombu.Connection(broker.url("admin")) as connection:
        connection.channel().exchange_declare(
            exchange=name, type=kind, durable=True, auto_delete=False
        )


def relay_connects(url: str, exchange: str) -> bool:
    """Whether the relay's own publisher gets past its connect (where it declares)."""
    publisher = open_publisher(url, exchange)
    try:
        publisher.connect()
    except BrokerUnavailable:
        return False
    finally:
        publisher.close()
    return True


def test_a_fresh_installation_passes_when_the_relay_may_declare_the_exchange(
    pg_database: str, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12: a migrated database and a broker user with the configure permission."""
    cases = f"cases-{uuid.uuid4().hex[:8]}"
    code, statuses, out = check(
        capsys,
        "--database-url",
        pg_url(pg_database),
        "--broker-url",
        broker.url("configurer"),
        "--exchange",
        cases,
    )
    assert statuses == dict.fromkeys(
        ("database", "migrations", "permissions", "broker", "exchange"), "PASS"
    ), out
    assert code == 0
    assert "all checks passed" in out
    assert f"exchange {cases!r} was missing: declared it (durable topic)" in out
    # Declared as the relay declares it, so the relay's own declare agrees with it.
    assert broker.exchanges()[cases] == ("topic", "true")
    assert relay_connects(broker.url("restricted"), cases) is False  # still needs configure
    assert relay_connects(broker.url("configurer"), cases) is True
    assert PASSWORD not in out


@pytest.mark.parametrize(
    ("role", "existing", "passes"),
    [
        ("configurer", None, True),
        ("configurer", "topic", True),
        ("restricted", None, False),
        # Passes a passive declare, yet the relay's declare is refused: it wants configure.
        ("restricted", "topic", False),
        # Exists, but not as the durable topic exchange the relay declares (406).
        ("configurer", "fanout", False),
    ],
)
def test_the_exchange_verdict_is_the_relays(
    broker: Broker,
    capsys: pytest.CaptureFixture[str],
    role: str,
    existing: str | None,
    passes: bool,
) -> None:
    """``check`` passes exactly when the relay's publisher can connect (and declare)."""
    tag = uuid.uuid4().hex[:8]
    checked, relayed = f"checked-{tag}", f"relayed-{tag}"  # the same set-up for each side
    for name in (checked, relayed):
        if existing:
            declare_as_admin(broker, name, existing)

    code, statuses, out = check(capsys, "--broker-url", broker.url(role), "--exchange", checked)

    assert relay_connects(broker.url(role), relayed) is passes
    assert statuses["broker"] == "PASS", out
    assert statuses["exchange"] == ("PASS" if passes else "FAIL"), out
    assert code == 1  # no database URL: the exit status is the database's
    exchange_line = next(line for line in out.splitlines() if line.split()[1:2] == ["exchange"])
    if passes:
        assert ("exists" if existing else "was missing: declared it") in exchange_line
        assert broker.exchanges()[checked] == ("topic", "true")
    elif role == "restricted":
        user = broker.users["restricted"]
        assert f"broker user {user!r} may not configure exchange {checked!r}" in out
        assert f"give {user!r} the configure permission on {checked!r}" in out
        assert f"rabbitmqctl set_permissions -p {broker.vhost} {user}" in out
        assert (checked in broker.exchanges()) is bool(existing)  # nothing created
    else:
        assert "is not the durable topic exchange the relay declares" in out
        assert "inequivalent arg 'type'" in out
        assert broker.exchanges()[checked] == (existing, "true")  # left as it was
    assert PASSWORD not in out
