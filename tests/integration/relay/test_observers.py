"""A relay's observers, against real PostgreSQL and RabbitMQ: every hook reaches every
observer, in order, and one that raises stops neither the others nor delivery."""

from __future__ import annotations

import datetime as dt
import logging
import typing
from collections import Counter
from collections.abc import Sequence

import kombu
import pytest
from sqlalchemy import Engine

from outbox.logs import FIELDS_ATTR
from outbox.relay.loop import Relay
from outbox.relay.observer import Hook, RelayObserver
from outbox.relay.publisher import open_publisher
from outbox.store.sqlstore import SqlStore
from tests.conftest import drain_queue
from tests.ops_support import publish_events, versions_of


class Recording(RelayObserver):
    """Counts each call of a hook, and what the relay said it published."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.published = 0
        self.confirmed: list[dt.datetime] = []

    def record(self, call: str) -> None:
        self.calls[call] += 1

    def loop_ticked(self) -> None:
        self.record("loop_ticked")

    def batch_published(self, count: int, seconds: float) -> None:
        self.published += count
        self.record("batch_published")

    def events_confirmed(self, created_at: Sequence[dt.datetime]) -> None:
        self.confirmed.extend(created_at)
        self.record("events_confirmed")

    def partitions_changed(self, owned: Sequence[int], total: int) -> None:
        self.record("partitions_changed")

    def broker_connected(self, connected: bool) -> None:
        self.record(f"broker_connected({connected})")

    def store_available(self, available: bool) -> None:
        self.record(f"store_available({available})")


class Raising(Recording):
    """Records each call, then raises: every hook fails."""

    def record(self, call: str) -> None:
        super().record(call)
        raise RuntimeError(f"{call} broke")


def test_every_observer_gets_every_hook_and_a_raising_one_stops_nothing(
    pg_engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    publish_events(pg_engine, 7, range(1, 6))
    publish_events(pg_engine, 8, range(1, 4))
    broken, first, second = Raising(), Recording(), Recording()
    # The raising one first: the ones after it still get each call.
    relay = Relay(
        SqlStore(pg_engine), open_publisher(amqp_url, exchange_name), observers=[broken, first]
    )
    relay.add_observer(second)
    assert relay.observers == (broken, first, second)
    with caplog.at_level(logging.ERROR, logger="outbox"):
        assert relay.drain(timeout=30) == 8

    messages = drain_queue(amqp_url, bound_queue, expected=8)
    assert sorted(versions_of(messages)) == [1, 1, 2, 2, 3, 3, 4, 5]
    for observer in (broken, first, second):
        assert observer.published == 8
        assert len(observer.confirmed) == 8
        assert observer.calls["partitions_changed"] == 1
        assert observer.calls["broker_connected(True)"] >= 1
        assert observer.calls["loop_ticked"] >= 1
        assert observer.calls["store_available(True)"] == observer.calls["loop_ticked"]
    assert first.calls == second.calls == broken.calls
    failed = [
        getattr(r, FIELDS_ATTR)
        for r in caplog.records
        if getattr(r, FIELDS_ATTR, {}).get("event") == "observer_hook_failed"
    ]
    # One record per failed call, each naming the hook and the observer.
    assert len(failed) == sum(broken.calls.values())
    assert {f["observer"] for f in failed} == {"Raising"}
    assert {f["hook"] for f in failed} >= {"batch_published", "events_confirmed", "loop_ticked"}


def test_hook_names_are_the_observer_methods() -> None:
    methods = {name for name in vars(RelayObserver) if not name.startswith("_")}
    assert set(typing.get_args(Hook)) == methods


def test_a_relay_without_observers_relays(
    pg_engine: Engine, amqp_url: str, exchange_name: str, bound_queue: kombu.Queue
) -> None:
    publish_events(pg_engine, 7, range(1, 3))
    relay = Relay(SqlStore(pg_engine), open_publisher(amqp_url, exchange_name))
    assert relay.observers == ()
    assert relay.drain(timeout=30) == 2
    assert versions_of(drain_queue(amqp_url, bound_queue, expected=2)) == [1, 2]
