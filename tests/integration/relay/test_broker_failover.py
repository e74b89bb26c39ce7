"""A list of broker URLs (``url1;url2``) against the shared broker, dead ports and a cut proxy.

kombu alone tries only the first URL of a list when asked for one attempt
(the relay's ``ensure_connection(max_retries=0)``), so a dead first node used
to stop publishing for good; the first test shows that, the others show the
publishers going round the list, sticking to the node that works, moving on
after a loss, logging one redacted line per failover and counting it in the
relay's metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import kombu.exceptions
import pytest
from sqlalchemy import Engine

from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.logs import FIELDS_ATTR
from outbox.ops.metrics import PrometheusObserver
from outbox.relay.amqp_publisher import AmqpPublisher
from outbox.relay.loop import Relay
from outbox.relay.message import OutgoingMessage
from outbox.relay.nodes import node_tls
from outbox.relay.publisher import open_publisher, publish_batch, tls_options
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue
from tests.integration.relay.tcp_gate import Gate, broker_url, gate_to
from tests.integration.relay.test_relay import publish_cases
from tests.integration.relay.test_tls import Certificates, TlsProxy, issue_certificates

PASSWORD = "n0t-the-guest-pw"


def _dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _dead_url(port: int, host: str = "127.0.0.1", scheme: str = "amqp") -> str:
    return f"{scheme}://guest:{PASSWORD}@{host}:{port}//"


def _message(position: int = 1) -> OutgoingMessage:
    return OutgoingMessage(
        position=position,
        message_id=str(uuid.uuid4()),
        routing_key="case.update",
        body=b"{}",
        content_type="application/json",
        timestamp=dt.datetime.now(dt.UTC),
        headers={},
        ordering_key=f"k{position}",
    )


def _failovers(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if getattr(r, FIELDS_ATTR, {}).get("event") == "broker_failover"
    ]


@pytest.fixture
def cut_proxy(amqp_url: str) -> Iterator[Gate]:
    with gate_to(amqp_url) as proxy:
        yield proxy


def test_kombu_alone_tries_only_the_first_url_of_a_list(amqp_url: str) -> None:
    # Why the publishers walk the list themselves: this is kombu's behaviour.
    connection = kombu.Connection(f"{_dead_url(_dead_port())};{amqp_url}", connect_timeout=2)
    with pytest.raises(kombu.exceptions.OperationalError):
        connection.ensure_connection(max_retries=0)
    connection.close()


def test_a_dead_first_node_does_not_block_publishing(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    ids = publish_cases(pg_engine, *({"tenantId": 1, "id": i} for i in range(20)))
    urls = f"{_dead_url(_dead_port())};{amqp_url}"
    relay = Relay(SqlStore(pg_engine), open_publisher(urls, exchange_name))
    started = time.monotonic()
    assert relay.drain(timeout=20) == 20
    assert time.monotonic() - started < 5
    received = drain_queue(amqp_url, bound_queue, expected=20)
    assert [m.properties["message_id"] for m in received] == [str(i) for i in ids]


def test_every_node_is_tried_once_per_connect_and_the_error_names_each_redacted() -> None:
    ports = [_dead_port(), _dead_port(), _dead_port()]
    publisher = AmqpPublisher(";".join(_dead_url(p) for p in ports), "x", connect_timeout=1)
    with pytest.raises(BrokerUnavailable) as raised:
        publisher.connect()
    message = str(raised.value)
    assert "3 broker nodes" in message
    assert all(f"127.0.0.1:{p}" in message for p in ports)
    assert PASSWORD not in message
    assert publisher.nodes.failovers == 0 and publisher.nodes.current is None


def test_after_a_loss_the_next_node_then_it_sticks_logs_and_metrics(
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    cut_proxy: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    through_proxy = broker_url(amqp_url, cut_proxy.port)
    direct = broker_url(amqp_url)
    publisher = AmqpPublisher(f"{through_proxy};{direct}", exchange_name)
    observer = PrometheusObserver()
    observer.watch_broker_nodes(publisher.nodes)

    def gauge(port: int) -> float | None:
        node = f"127.0.0.1:{port}"
        return observer.registry.get_sample_value("outbox_broker_node_connected", {"node": node})

    assert publish_batch(publisher, [_message(1)], 5).failure is None
    assert publisher.nodes.current == through_proxy
    assert (gauge(cut_proxy.port), gauge(5672)) == (1, 0)

    cut_proxy.shut()  # the node dies under the connection
    result = publish_batch(publisher, [_message(2)], 5)
    assert result.failure == "connection"
    assert not publisher.connected
    assert (gauge(cut_proxy.port), gauge(5672)) == (0, 0)

    assert publish_batch(publisher, [_message(3)], 5).failure is None
    assert publisher.nodes.current == direct
    assert (gauge(cut_proxy.port), gauge(5672)) == (0, 1)
    assert observer.registry.get_sample_value("outbox_broker_failovers_total") == 1

    (line,) = _failovers(caplog)
    fields = getattr(line, FIELDS_ATTR)
    assert fields["from_node"].endswith(f"@127.0.0.1:{cut_proxy.port}//")
    assert fields["to_node"].endswith("@127.0.0.1:5672//")
    assert fields["down_seconds"] is not None and fields["down_seconds"] < 5
    secret = f":{kombu.Connection(amqp_url).password}@"
    assert secret not in line.getMessage() and secret not in str(fields)

    # A clean close and a reconnect stay on the node that works: no failover.
    publisher.close()
    assert publish_batch(publisher, [_message(4)], 5).failure is None
    assert publisher.nodes.current == direct
    assert len(_failovers(caplog)) == 1
    publisher.close()
    received = drain_queue(amqp_url, bound_queue, expected=3, timeout=5)
    assert len(received) == 3


def test_lists_that_mix_tls_and_plain_or_bare_hosts_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="without TLS"):
        open_publisher("amqps://u:p@h1:5671//;amqp://u:p@h2:5672//", "x")
    with pytest.raises(ConfigurationError, match="not a URL"):
        open_publisher("amqp://u:p@h1:5672//;h2", "x")
    with pytest.raises(ConfigurationError, match="mixes transports"):
        open_publisher("amqp://u:p@h1:5672//;redis://h2:6379/0", "x")


def test_each_node_verifies_its_own_host_name() -> None:
    options = tls_options("amqps://u:p@mq1:5671//;amqps://u:p@mq2:5671//", ca="/dev/null")
    assert options is not None and options["server_hostname"] == "mq1"
    second = node_tls(options, "amqps://u:p@mq2:5671//")
    assert isinstance(second, dict) and second["server_hostname"] == "mq2"
    assert options["server_hostname"] == "mq1"  # a copy: py-amqp writes into the one it gets


@pytest.fixture(scope="module")
def certificates() -> Iterator[Certificates]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory = Path(tempfile.mkdtemp(prefix="outbox-failover-tls-"))
    try:
        yield issue_certificates(directory)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"openssl failed: {exc.stderr}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_tls_failover_verifies_the_second_node_against_its_own_name(
    amqp_url: str, exchange_name: str, bound_queue: kombu.Queue, certificates: Certificates
) -> None:
    parsed = kombu.Connection(amqp_url)
    with TlsProxy(certificates, (parsed.hostname or "127.0.0.1", parsed.port or 5672)) as proxy:
        # The dead first node's name (127.0.0.2) is not in the proxy's
        # certificate: verifying the second node against it would fail.
        dead = _dead_url(_dead_port(), "127.0.0.2", "amqps")
        urls = f"{dead};{broker_url(amqp_url, proxy.port, 'amqps')}"
        ssl = tls_options(
            urls,
            ca=str(certificates.ca),
            cert=str(certificates.client_cert),
            key=str(certificates.client_key),
        )
        publisher = AmqpPublisher(urls, exchange_name, ssl=ssl, connect_timeout=2)
        try:
            assert publish_batch(publisher, [_message(1)], 5).failure is None
            assert publisher.nodes.current is not None and "localhost" in publisher.nodes.current
        finally:
            publisher.close()
        assert proxy.handshakes == 1
    assert len(drain_queue(amqp_url, bound_queue, expected=1, timeout=5)) == 1
