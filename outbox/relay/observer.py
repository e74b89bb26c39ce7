"""Hooks the relay calls as it works, for metrics and health (no-ops by default).

Subclass :class:`RelayObserver` and override what you need; a relay calls
each hook on every observer it was given (``Relay(observers=...)``,
``Relay.add_observer``), in that order. An exception in a hook is logged and
ignored, and the other observers still get the call: observing must never
stop the relay.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Literal

# The name of each hook of RelayObserver, as the relay calls it on every observer.
Hook = Literal[
    "loop_ticked",
    "batch_published",
    "events_confirmed",
    "publish_failed",
    "event_dead",
    "partitions_changed",
    "broker_connected",
    "store_available",
]


class RelayObserver:
    def loop_ticked(self) -> None:
        """The relay loop went round once (liveness)."""

    def batch_published(self, count: int, seconds: float) -> None:
        """The broker confirmed ``count`` messages (their rows are marked next); ``seconds``
        is how long the oldest message then in the window had waited."""

    def events_confirmed(self, created_at: Sequence[dt.datetime]) -> None:
        """The broker confirmed messages whose rows were created at these moments
        (aware, UTC; one per message), right after :meth:`batch_published`."""

    def publish_failed(self, kind: str, count: int) -> None:
        """``count`` messages sent were not confirmed; ``kind`` is nacked,
        unroutable, timeout, connection, refused or unsendable."""

    def event_dead(self, ordering_key: str, reason: str) -> None:
        """A row was marked dead and its key is held; ``reason`` is the cause:
        invalid, unroutable, unsendable (AMQP cannot carry it) or refused (by the broker)."""

    def partitions_changed(self, owned: Sequence[int], total: int) -> None:
        """The set of partitions this relay publishes changed."""

    def broker_connected(self, connected: bool) -> None:
        """The broker connection came up or went down."""

    def store_available(self, available: bool) -> None:
        """A database call succeeded or failed for lack of a connection."""
