"""A relay that loses the broker while its peer keeps it hands its partitions over at once.

Held, its partitions would stall until its leases ran out, and its next
rebalance would claim them back while the broker was still out of reach: a
relay cut off from the broker alone would stall its share of the keys again
and again. Relay A reaches the shared broker through a gate that can refuse
every connection (as a broker host that is down or unreachable does); relay B
connects directly. Both run on the shared PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator

import kombu
import pytest
from sqlalchemy import Engine

from outbox.logs import FIELDS_ATTR
from outbox.relay.loop import Relay
from outbox.relay.publisher import open_publisher
from outbox.relay.settings import RelaySettings
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue
from tests.integration.relay.tcp_gate import Gate, broker_url, gate_to
from tests.integration.relay.test_relay import publish_cases, wait_for

TTL = 3.0
SETTINGS = RelaySettings(lease_ttl=TTL, poll_interval=0.05, backoff_initial=0.1, backoff_max=0.3)


@pytest.fixture
def gate(amqp_url: str) -> Iterator[Gate]:
    with gate_to(amqp_url) as gate:
        yield gate


class Sampler:
    """Notes relay A's partitions every 20 ms, with the time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.monotonic(), self.relay.partitions))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_relay_cut_off_from_the_broker_hands_its_partitions_to_its_peer(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    cut_off = Relay(
        SqlStore(pg_engine),
        open_publisher(broker_url(amqp_url, gate.port), exchange_name),
        SETTINGS,
        relay_id="relay-a",
    )
    peer = Relay(
        SqlStore(pg_engine), open_publisher(amqp_url, exchange_name), SETTINGS, relay_id="relay-b"
    )
    partition_count = cut_off.store.partition_count()
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,)) for r in (cut_off, peer)]
    resources: list[int] = []  # per event, in commit order: the resource (its key)

    def publish(numbers: range) -> list[uuid.UUID]:
        resources.extend(numbers)
        return publish_cases(pg_engine, *({"tenantId": 1, "id": i} for i in numbers))

    ids = publish(range(40))
    sampler = Sampler(cut_off)
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: bool(cut_off.partitions) and bool(peer.partitions), 20, "a shared lease")
        gate.shut()
        shut_at = time.monotonic()
        wait_for(lambda: not cut_off.partitions, 5, "relay A to stand down")
        stood_down = time.monotonic() - shut_at
        # Its peer takes them at its next rebalance (every TTL / 5), long before the
        # leases would have run out (TTL).
        wait_for(lambda: len(peer.partitions) == partition_count, TTL, "relay B to take all")
        taken = time.monotonic() - shut_at
        ids += publish(range(40))
        time.sleep(TTL)  # several of its rebalances and reconnects, still cut off
        healed_at = time.monotonic()
        gate.open = True
        wait_for(lambda: bool(cut_off.partitions), 10, "relay A to claim a share again")
        reclaimed = time.monotonic() - healed_at
        ids += publish(range(20, 60))
        received = drain_queue(amqp_url, bound_queue, expected=len(ids), timeout=20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
        sampler.stop()

    held_while_cut = [
        partitions
        for at, partitions in sampler.samples
        if shut_at + stood_down < at < healed_at and partitions
    ]
    assert not held_while_cut, "relay A claimed partitions while the broker was out of reach"
    assert stood_down < 2.0, f"stood down after {stood_down:.2f} s"
    assert taken < TTL, f"relay B held everything after {taken:.2f} s"
    assert reclaimed < 5.0, f"relay A took a share again after {reclaimed:.2f} s"
    arrived = [m.properties["message_id"] for m in received]
    assert set(arrived) == {str(i) for i in ids}
    resource_of = {str(i): r for i, r in zip(ids, resources, strict=True)}
    first: dict[int, list[str]] = {}
    for message_id in dict.fromkeys(arrived):  # first arrivals, in arrival order
        first.setdefault(resource_of[message_id], []).append(message_id)
    committed: dict[int, list[str]] = {}
    for event_id, resource in zip(ids, resources, strict=True):
        committed.setdefault(resource, []).append(str(event_id))
    assert first == committed, "a key's first arrivals left commit order"
    lines = [
        getattr(r, FIELDS_ATTR)
        for r in caplog.records
        if getattr(r, FIELDS_ATTR, {}).get("event") == "relay_stood_down"
    ]
    assert lines and lines[0]["partitions"], lines
