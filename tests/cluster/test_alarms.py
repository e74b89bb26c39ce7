"""A broker that blocks publishers (a resource alarm) is waited for, not timed out.

RabbitMQ blocks every publishing connection of a cluster while any node is
short of memory or disk, and says so (``connection.blocked``). It reads
nothing from those connections meanwhile, so no confirm can come. A relay that
counted the wait towards its confirm timeout would drop its connection every
``confirm_timeout``, reconnect into the same alarm and resend: noise, no
progress. The alarm is raised on the suite's own cluster (a memory watermark
near zero on one node), never on the shared broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import kombu
import pytest
from sqlalchemy import Engine

from outbox.logs import FIELDS_ATTR
from outbox.relay.amqp_publisher import AmqpPublisher
from outbox.relay.loop import Relay
from outbox.relay.settings import RelaySettings
from outbox.store.sqlstore import SqlStore
from tests.cluster import harness as cl
from tests.conftest import drain_queue
from tests.integration.relay.test_relay import publish_cases, wait_for

pytestmark = pytest.mark.cluster

CONFIRM_TIMEOUT = 2.0


@pytest.fixture
def amqp_url(cluster: cl.Cluster) -> str:
    """The second node: the alarm is raised on the first, and blocks the whole cluster."""
    return cluster.nodes[1].url


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[float, dict[str, object]]]:
    return [
        (r.created, getattr(r, FIELDS_ATTR))
        for r in caplog.records
        if getattr(r, FIELDS_ATTR, {}).get("event") == name
    ]


@pytest.fixture
def alarm(cluster: cl.Cluster) -> Iterator[cl.RabbitNode]:
    node = cluster.nodes[0]
    yield node
    node.ctl("set_vm_memory_high_watermark", "0.4")  # the default: the alarm clears


def test_a_memory_alarm_pauses_the_confirm_timeout_instead_of_reconnecting(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    alarm: cl.RabbitNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    relay = Relay(
        SqlStore(pg_engine),
        AmqpPublisher(amqp_url, exchange_name),
        RelaySettings(confirm_timeout=CONFIRM_TIMEOUT, poll_interval=0.05),
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    try:
        ids = publish_cases(pg_engine, *({"tenantId": 1, "id": i % 5} for i in range(20)))
        assert len(drain_queue(amqp_url, bound_queue, expected=20, timeout=20)) == 20
        alarm.ctl("set_vm_memory_high_watermark", "0.000001")
        ids += publish_cases(pg_engine, *({"tenantId": 1, "id": i % 5} for i in range(30)))
        wait_for(lambda: bool(_events(caplog, "broker_blocked")), 20, "connection.blocked")
        blocked_at = _events(caplog, "broker_blocked")[0][0]
        time.sleep(3 * CONFIRM_TIMEOUT)
        cleared_at = time.time()
        alarm.ctl("set_vm_memory_high_watermark", "0.4")
        wait_for(lambda: bool(_events(caplog, "broker_unblocked")), 20, "connection.unblocked")
        received = drain_queue(amqp_url, bound_queue, expected=30, timeout=20)
    finally:
        stop.set()
        thread.join(20)

    failures = [f for at, f in _events(caplog, "relay_publish_failed") if at >= blocked_at]
    assert not failures, f"the relay gave up on messages while blocked: {failures}"
    (_, unblocked), *_ = _events(caplog, "broker_unblocked")
    blocked_for = unblocked["blocked_seconds"]
    assert isinstance(blocked_for, float) and blocked_for >= cleared_at - blocked_at - 0.5
    # Nothing resent: each event once, each key's events in commit order.
    arrived = [m.properties["message_id"] for m in received]
    assert sorted(arrived) == sorted(str(i) for i in ids[20:])
    committed = [str(i) for i in ids[20:]]
    for key in range(5):
        of_key = committed[key::5]  # event n of the batch is resource n % 5
        assert [a for a in arrived if a in of_key] == of_key
