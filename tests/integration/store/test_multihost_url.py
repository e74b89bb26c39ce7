"""Multi-host database URLs (a primary and its standbys), against the shared server.

Each URL names a dead port first and the shared PostgreSQL second, with
``target_session_attrs=read-write``: libpq tries the hosts in order, so a
drain that works went through the second host. The failover itself, on a
throwaway primary and standby, is in tests/failover (``pytest -m failover``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import kombu
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from outbox.redaction import redact
from outbox.relay.listener import NotifyListener
from outbox.relay.loop import Wakeup
from outbox.store.engine import create_outbox_engine, normalize_url
from outbox.store.session import relay_connect_args
from tests.conftest import drain_queue, pg_url
from tests.ops_support import publish_events, run_cli, versions_of

PASSWORD = "multi-host-s3cret"  # trust authentication: the server never asks for it


def dead_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _shared(database: str) -> tuple[str, str, int]:
    url = make_url(pg_url(database))
    return url.username or "postgres", url.host or "127.0.0.1", url.port or 5432


def sqlalchemy_form(database: str, dead: int) -> str:
    user, host, port = _shared(database)
    return (
        f"postgresql+psycopg://{user}:{PASSWORD}@/{database}"
        f"?host=127.0.0.1:{dead}&host={host}:{port}&target_session_attrs=read-write"
    )


def libpq_query_form(database: str, dead: int) -> str:
    user, host, port = _shared(database)
    return (
        f"postgresql://{user}:{PASSWORD}@/{database}"
        f"?host=127.0.0.1,{host}&port={dead},{port}&target_session_attrs=read-write"
    )


def libpq_netloc_form(database: str, dead: int) -> str:
    user, host, port = _shared(database)
    return (
        f"postgresql://{user}:{PASSWORD}@127.0.0.1:{dead},{host}:{port}/{database}"
        "?target_session_attrs=read-write"
    )


FORMS = [sqlalchemy_form, libpq_query_form, libpq_netloc_form]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_drain_through_a_multi_host_url_whose_first_host_is_down(
    form: Callable[[str, int], str],
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = form(pg_database, dead_port())
    # A producer's engine as outbox makes it, and as SQLAlchemy does (its own forms).
    producer = create_outbox_engine(url)
    try:
        publish_events(producer, 7, range(1, 8))
    finally:
        producer.dispose()
    if form is not libpq_netloc_form:  # SQLAlchemy's parser knows no host list in the netloc
        plain = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            publish_events(plain, 8, range(1, 4))
        finally:
            plain.dispose()

    args = ["drain", "--database-url", url, "--broker-url", amqp_url, "--exchange", exchange_name]
    assert run_cli(args) == 0
    out, err = capsys.readouterr()
    expected = 7 if form is libpq_netloc_form else 10
    assert f"published {expected} events; 0 still pending" in out
    assert PASSWORD not in out + err
    messages = drain_queue(amqp_url, bound_queue, expected=expected)
    assert sorted(versions_of(messages)) == sorted([*range(1, 8), *range(1, 4)][:expected])


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_the_relays_listen_connection_reaches_the_second_host(
    form: Callable[[str, int], str], pg_database: str
) -> None:
    # LISTEN runs on a libpq connection of its own, opened from the URL's libpq form.
    url = normalize_url(form(pg_database, dead_port()))
    wakeup = Wakeup()
    listener = NotifyListener(url, wakeup, connect_args=relay_connect_args(url, 6.0))
    listener.start()
    try:
        assert listener.listening.wait(10), "the listener never connected"
        assert wakeup.wait(10)  # set once on connecting, for what it may have missed
        wakeup.clear()
        with psycopg.connect(pg_url(pg_database), autocommit=True) as conn:
            conn.execute("NOTIFY outbox_event")
        assert wakeup.wait(10), "no wake-up from a NOTIFY on the second host"
    finally:
        listener.stop()


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_check_shows_the_hosts_and_hides_the_password(
    form: Callable[[str, int], str],
    pg_database: str,
    amqp_url: str,
    exchange_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = form(pg_database, dead_port())
    assert PASSWORD not in redact(url) and "***" in redact(url)
    assert PASSWORD not in repr(normalize_url(url))
    args = ["check", "--database-url", url, "--broker-url", amqp_url, "--exchange", exchange_name]
    assert run_cli(args) == 0
    out, err = capsys.readouterr()
    assert "PASS  database" in out
    assert "***" in out and PASSWORD not in out + err


def test_a_relay_error_names_the_hosts_without_the_password(
    pg_database: str, amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = dead_port(), dead_port()
    url = (
        f"postgresql+psycopg://postgres:{PASSWORD}@/{pg_database}"
        f"?host=127.0.0.1:{first}&host=127.0.0.1:{second}&target_session_attrs=read-write"
    )
    assert run_cli(["drain", "--database-url", url, "--broker-url", amqp_url]) != 0
    out, err = capsys.readouterr()
    assert "database unavailable" in err and "Connection refused" in err
    assert PASSWORD not in out + err
