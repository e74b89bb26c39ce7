"""``python -m benchmarks.traced_relay``: ``outbox relay`` with a timeline of what it did.

The latency benchmark's attribution (``python -m benchmarks --only latency
--trace``) runs the relay through this module: the same command, settings
and code as ``outbox relay``, with timers wrapped around the work that could
hold an event up. At exit it writes, to the file ``BENCH_TRACE_FILE`` names,
JSON with:

- ``spans``: ``[kind, start, end]`` on the wall clock (``time.time()``, the
  clock the producers and the consumer stamp events with): database fetches
  and marks, lease renewals, scheduled jobs, log records, garbage collections,
  NOTIFY wake-ups (start = end);
- ``sent``: event id -> when the relay wrote it to the broker's socket.

The wrappers cost a few microseconds per call; the untraced run gives the
headline figures, this one says where the slow events spent their time.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from outbox.relay.amqp_publisher import AmqpPublisher
from outbox.relay.message import OutgoingMessage
from outbox.relay.wakeup import Wakeup
from outbox.store.sqlstore import SqlStore

Span = tuple[str, float, float]


class Timeline:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.sent: dict[str, float] = {}
        self._gc_started = 0.0

    def timed(self, kind: str | Callable[..., str], func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return func(*args, **kwargs)
            finally:
                name = kind(*args, **kwargs) if callable(kind) else kind
                self.spans.append((name, start, time.time()))

        return wrapper

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.time()
        else:
            self.spans.append((f"gc{info.get('generation', '')}", self._gc_started, time.time()))

    def dump(self, path: str) -> None:
        with open(path, "w") as out:
            json.dump({"spans": self.spans, "sent": self.sent}, out)


def _fetch_or_mark(
    _store: Any,
    mark: Sequence[int],
    partitions: Sequence[int],
    limit: int,
    *args: Any,
    **kwargs: Any,
) -> str:
    return "fetch" if partitions and limit > 0 else "mark"


def install(timeline: Timeline) -> None:
    SqlStore.mark_and_fetch = timeline.timed(_fetch_or_mark, SqlStore.mark_and_fetch)  # type: ignore[method-assign]
    SqlStore.mark_delivered = timeline.timed("mark", SqlStore.mark_delivered)  # type: ignore[method-assign]
    SqlStore.rebalance = timeline.timed("rebalance", SqlStore.rebalance)  # type: ignore[method-assign]
    logging.Logger.handle = timeline.timed("log", logging.Logger.handle)  # type: ignore[method-assign]

    original_set = Wakeup.set

    def wakeup_set(self: Wakeup) -> None:
        now = time.time()
        timeline.spans.append(("notify", now, now))
        original_set(self)

    Wakeup.set = wakeup_set  # type: ignore[method-assign]

    original_send = AmqpPublisher.send

    def send(self: AmqpPublisher, messages: Sequence[OutgoingMessage]) -> None:
        original_send(self, messages)
        now = time.time()
        for message in messages:
            timeline.sent.setdefault(message.message_id, now)

    AmqpPublisher.send = send  # type: ignore[method-assign]

    from apscheduler.schedulers.base import BaseScheduler

    original_add_job = BaseScheduler.add_job

    def add_job(self: BaseScheduler, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = f"job:{getattr(func, '__name__', 'job')}"
        return original_add_job(self, timeline.timed(name, func), *args, **kwargs)

    BaseScheduler.add_job = add_job
    gc.callbacks.append(timeline.on_gc)


def main() -> int:
    path = os.environ["BENCH_TRACE_FILE"]
    timeline = Timeline()
    install(timeline)
    atexit.register(timeline.dump, path)
    from outbox.cli.main import main as outbox_main

    return outbox_main(["relay", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
