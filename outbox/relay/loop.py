"""The relay loop: fetch pending rows, validate, publish in order, mark delivered.

Orchestration only, over a store, a publisher and a wake-up source, so it can
be embedded and tested with fakes; signals, scheduling and configuration live
in :mod:`outbox.cli`.

The relay streams. Fetched rows become messages in one lane per ordering key
(:mod:`outbox.relay.lanes`); the publisher keeps a window of up to ``window``
messages the broker has not confirmed, and as confirms arrive the room they
free is filled again at once. A key never has more than one unconfirmed
message on the wire: whatever the broker does to a message (nack, return,
refusal, timeout, lost connection), nothing later of its key was sent behind
it, so first arrivals of a key are always in commit order. The database work
runs on the relay's database thread, beside the broker's::

    main thread: send into the window | read confirms | send what they freed ...
    database thread:  mark the confirmed, fetch and prepare more rows, renew leases

Rows are never marked delivered before the broker confirmed them. A message
the broker did not confirm goes back to the head of its key's lane and is
resent with its message id. A row that can never become a message (invalid,
unencodable, refused by the broker) is marked dead with the reason and holds
only its key; nothing a single row holds can stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import (
    BrokerUnavailable,
    OutboxError,
    PublishError,
    StoreUnavailable,
    UnsendableEventError,
)
from outbox.logs import emit
from outbox.relay.backoff import Backoff, FailureLog
from outbox.relay.lanes import Lanes
from outbox.relay.message import OutgoingMessage
from outbox.relay.observer import Hook, RelayObserver
from outbox.relay.outcome import (
    EXHAUSTED,
    NACKED,
    REFUSED,
    RETURNED,
    TIMEOUT,
    UNSENDABLE,
    Failure,
)
from outbox.relay.preparing import (
    NOT_THE_ROWS_FAULT,
    BodyEncoder,
    Validator,
    message_for,
    reason_of,
)
from outbox.relay.publisher import Publisher
from outbox.relay.settings import RelaySettings
from outbox.relay.wakeup import Bell, Wakeup
from outbox.store.protocol import Store
from outbox.store.rows import EventRow, Lease

__all__ = ["Relay", "RelaySettings", "Wakeup"]

log = logging.getLogger(__name__)

# How often the loop answers the broker's heartbeats while it is busy.
_KEEPALIVE_EVERY = 1.0
# Confirmed rows wait this long (seconds) for their mark. With nothing out, the
# next fetch (a NOTIFY) carries the mark in its own round trip; the marking
# thread takes it only if no fetch came within _MARK_GRACE more.
_MARK_AFTER = 0.1
_MARK_GRACE = 0.02
# The liveness hooks (loop_ticked, store_available) run at most this often while
# busy: the loop goes round once per few confirms, thousands of times a second,
# and each call takes the metrics' locks.
_TICK_EVERY = 0.05


@dataclass(eq=False)
class _Job:
    """Work handed to the database thread; one at a time."""

    future: Future[Any]
    kind: str  # "fetch" (fetch and prepare) or "rebalance" (renew and share leases)
    started: float
    # The lanes' generation when it was submitted: a fetch whose lanes were
    # cleared meanwhile is dropped (it left out rows the lanes no longer hold).
    generation: int
    dropped_keys: set[str] = field(default_factory=set)


class Relay:
    """Publishes the pending rows of the partitions this relay leases."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        settings: RelaySettings | None = None,
        *,
        wakeup: Wakeup | None = None,
        observers: Sequence[RelayObserver] = (),
        content_validator: Validator | None = None,
        body_encoder: BodyEncoder | None = None,
        relay_id: str | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings or RelaySettings()
        self.wakeup = wakeup or Wakeup()
        self._observers: tuple[RelayObserver, ...] = tuple(observers)
        self.content_validator = content_validator
        self.body_encoder = body_encoder
        self.relay_id = relay_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = Lease(epochs={})
        self._held: frozenset[int] = frozenset()
        self._lease_deadline = 0.0
        self._next_rebalance = 0.0
        self._lanes = Lanes()
        self._generation = 0
        # Confirmed, not marked yet; and those the marking thread is marking now:
        # position -> event id (rows are marked by both: Store.mark_delivered).
        self._to_mark: dict[int, str] = {}
        self._marking: dict[int, str] = {}
        self._mark_job: Future[None] | None = None
        self._confirmed_at = 0.0  # when the oldest confirm in _to_mark arrived
        self._mark_executor: ThreadPoolExecutor | None = None
        self._job: _Job | None = None
        self._job_bell: Bell | None = None
        # Whether the last fetch may have left rows behind (it was full, keys
        # were dropped or resumed since): fetch again without waiting for a
        # NOTIFY. Without it, and with nothing queued or out, the relay is idle.
        self._more = True
        self._fetched_at = 0.0
        self._send_after = 0.0
        self._next_keepalive = 0.0
        self._next_tick = 0.0
        self._store_down = False
        # Keys whose head message no queue is bound for (unroutable=retry): key -> resume time.
        self._paused: dict[str, float] = {}
        self._pause_backoff: dict[str, Backoff] = {}
        # Messages not confirmed when the broker refused one of several out:
        # sent alone until the refused one is found.
        self._suspects: set[int] = set()
        self._unroutable_routes: set[str] = set()
        # Nacks of a queued message since it was fetched, by position.
        self._nacks: dict[int, int] = {}
        self._backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        self._publish_backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        self._store_log = FailureLog(log, "relay_store_unavailable", "relay_store_available")
        self._broker_log = FailureLog(log, "relay_broker_unavailable", "relay_broker_available")
        self._publish_log = FailureLog(log, "relay_publish_failed", "relay_publish_recovered")
        self._registered = False
        # The broker was out of reach and the partitions were released: claim
        # none until a connection opens (_stand_down, _maybe_rebalance).
        self._stood_down = False
        self._stop = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self.published_total = 0

    # -- public ---------------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        return self._lease.partitions if self._lease_valid() else []

    @property
    def observers(self) -> tuple[RelayObserver, ...]:
        """The observers, in the order each hook is called on them."""
        return self._observers

    def add_observer(self, observer: RelayObserver) -> None:
        """Call ``observer``'s hooks too, after those of the observers already there.

        Meant for the composition root, before :meth:`run` or :meth:`drain`;
        the tuple is replaced, never changed, so a loop going round meanwhile
        sees either the old observers or the new ones.
        """
        self._observers = (*self._observers, observer)

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, then settle what is in flight and let go."""
        emit(log, "relay_started", "relay %s started", self.relay_id, relay_id=self.relay_id)
        self._stop = stop
        try:
            while not stop.is_set():
                self._step_safely(stop)
        finally:
            self._shutdown()
        emit(log, "relay_stopped", "relay %s stopped", self.relay_id, relay_id=self.relay_id)

    def drain(self, timeout: float = 60.0) -> int:
        """Publish until no sendable row is left in owned partitions; return how many."""
        start = self.published_total
        deadline = time.monotonic() + timeout
        self._stop = threading.Event()
        self._more = True
        try:
            while time.monotonic() < deadline:
                if self._step_safely(self._stop, wait_when_idle=False):
                    break
        finally:
            self._shutdown()
        return self.published_total - start

    # -- the loop ---------------------------------------------------------------

    def _step_safely(self, stop: threading.Event, *, wait_when_idle: bool = True) -> bool:
        try:
            idle = self._step()
            if idle and wait_when_idle and not self.publisher.connected:
                # Connect while idle too: an unreachable broker is reported when
                # it goes away, not only once there is work for it.
                self._connect()
        except StoreUnavailable as exc:
            self._store_log.failed("%s", exc)
            self._store_down = True
            self._observe("store_available", False)
            self._recover_from_error()
            stop.wait(self._backoff.next_delay())
            return False
        except BrokerUnavailable as exc:
            self._broker_log.failed("%s", exc)
            self._observe("broker_connected", False)
            self._recover_from_error()
            self._stand_down()
            stop.wait(self._backoff.next_delay())
            return False
        except OutboxError as exc:
            emit(log, "relay_error", "%s", exc, level=logging.ERROR)
            self._recover_from_error()
            stop.wait(self._backoff.next_delay())
            return False
        self._backoff.reset()
        self._store_log.recovered("database reachable again")
        now = time.monotonic()
        if now >= self._next_tick or self._store_down:
            self._next_tick = now + _TICK_EVERY
            self._store_down = False
            self._observe("store_available", True)
            self._observe("loop_ticked")
        if idle and wait_when_idle:
            self.publisher.keepalive()  # broker heartbeats: an idle connection stays open
            self.wakeup.wait(self._idle_timeout())
        return idle

    def _step(self) -> bool:
        """One turn of the loop; True when there was nothing to do.

        Verdicts first (they free keys and room), then the database work
        (inline when nothing is in flight: no thread hand-off on the latency
        path), then fill the window, then wait for whatever comes next: a
        confirm, the database thread, a NOTIFY, or a deadline.
        """
        now = time.monotonic()
        if self._job_bell is not None:
            self._job_bell.clear()  # before looking: a job ending from now on rings it again
        self._finish_marking()
        self._finish_job()
        self._maybe_rebalance(now)
        if not self.partitions:
            # A NOTIFY is a hint to fetch, and with no partition there is nothing to
            # fetch: left set, it would keep the loop from waiting (_wait, _idle).
            self.wakeup.clear()
        self._resume_paused(now)
        self._settle(0.0)
        self._expire(now)
        self._fill_window(now)  # first: what a confirm freed goes out before any database work
        self._start_marking(now)
        if self._start_database_work(now):
            self._fill_window(now)
        if now >= self._next_keepalive:
            self._next_keepalive = now + _KEEPALIVE_EVERY
            self.publisher.keepalive()
        if self._idle():
            return True
        self._wait(now)
        return False

    def _idle(self) -> bool:
        return (
            not self._lanes
            and self._job is None
            and self._mark_job is None
            and not self._to_mark
            and (not self._more or not self.partitions)
            and not self.wakeup.is_set()
        )

    def _wait(self, now: float) -> None:
        """Block until a confirm, the database thread, a NOTIFY or the next deadline."""
        if self.publisher.unsettled_news:
            return  # verdicts the publisher holds, or frames it has not read yet
        readable: list[int] = []
        deadlines = [self._next_rebalance, now + _KEEPALIVE_EVERY]
        if self._to_mark and self._mark_job is None:
            deadlines.append(self._confirmed_at + self._mark_delay())
        publisher_fd = self.publisher.fileno() if self._lanes.out else None
        if publisher_fd is not None:
            readable.append(publisher_fd)
            deadline = self._confirm_deadline()
            if deadline is not None:
                deadlines.append(deadline)
        if self._job is not None or self._mark_job is not None:
            assert self._job_bell is not None
            readable.append(self._job_bell.fileno())
        if self._job is None:  # else a NOTIFY waits for the fetch under way to end
            if self.wakeup.is_set():
                return  # a NOTIFY to act on
            readable.append(self.wakeup.fileno())
            deadlines.append(self._fetched_at + self.settings.poll_interval)
        if self._lanes.has_ready:
            if self._send_after > now:
                deadlines.append(self._send_after)
            elif self._lanes.out < self.settings.window and self._lease_valid():
                return  # room to send: no reason to wait
        if self._paused:
            deadlines.append(min(self._paused.values()))
        timeout = max(0.0, min(deadlines) - now)
        if readable:
            select.select(readable, [], [], timeout)
        else:
            self._stop.wait(timeout)

    # -- the database thread ------------------------------------------------------

    def _bell(self) -> Bell:
        if self._job_bell is None:
            self._job_bell = Bell()
        return self._job_bell

    def _submit(self, kind: str, work: Callable[[], Any], now: float) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-db")
        bell = self._bell()
        future = self._executor.submit(work)
        self._job = _Job(future, kind, now, self._generation)
        future.add_done_callback(lambda _: bell.ring())

    def _finish_job(self, *, wait: bool = False) -> None:
        """Apply the database thread's job if it is done (or, with ``wait``, once it is)."""
        job = self._job
        if job is None or not (wait or job.future.done()):
            return
        self._job = None
        result = job.future.result()
        if job.kind == "rebalance":
            self._apply_lease(result, job.started)
        else:
            rows, messages = result
            self._fetched(job, rows, messages)

    def _start_marking(self, now: float) -> None:
        """Hand what the broker confirmed to the marking thread, if it is free and marks are due.

        Marks run on a thread and a connection of their own, beside the
        fetches: a mark of 500 rows costs PostgreSQL about as much as the
        fetch of 500, and the two no longer wait for each other. They are due
        once a batch has been confirmed or _MARK_AFTER seconds after the first
        unmarked confirm: a hot key, confirmed one message at a time, and a
        trickle of events, each sent alone, are marked in groups (a
        transaction per event would cost more than publishing it).
        """
        if not self._marks_due(now, self._mark_delay()):
            return
        if not self._lanes.out and self._job is None and self._fetch_wanted(now):
            return  # the inline fetch about to run carries them (_start_database_work)
        if self._mark_executor is None:
            self._mark_executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-mark")
        self._marking, self._to_mark = self._to_mark, {}
        bell = self._bell()
        self._mark_job = self._mark_executor.submit(self._mark_fast, self._marking)
        self._mark_job.add_done_callback(lambda _: bell.ring())

    def _mark_delay(self) -> float:
        """How long confirmed rows wait for a mark of their own (see _MARK_GRACE)."""
        return _MARK_AFTER if self._lanes.out else _MARK_AFTER + _MARK_GRACE

    def _marks_due(self, now: float, delay: float = _MARK_AFTER) -> bool:
        return (
            self._mark_job is None
            and bool(self._to_mark)
            and (
                len(self._to_mark) >= self.settings.batch_size or now - self._confirmed_at >= delay
            )
        )

    def _finish_marking(self, *, wait: bool = False) -> None:
        job = self._mark_job
        if job is None or not (wait or job.done()):
            return
        self._mark_job = None
        marking, self._marking = self._marking, {}
        try:
            job.result()
        except BaseException:
            self._to_mark.update(marking)  # marked later; marking twice is harmless
            raise

    def _start_database_work(self, now: float) -> bool:
        """Fetch and prepare more rows, when the lanes run low and rows may be waiting.

        True when it fetched inline (nothing was out), so that what it found can go now.
        """
        if self._job is not None or not self._fetch_wanted(now):
            return False
        limit = self.settings.batch_size
        self.wakeup.clear()  # a NOTIFY from now on sets it again
        self._fetched_at = now
        # Confirmed rows not marked yet are still pending in the table: leave them out too.
        exclude = [*self._lanes.positions(), *self._to_mark, *self._marking]
        partitions = self.partitions
        paused = list(self._paused)
        if self._lanes.out:
            # Fenced: only partitions this relay holds by an unexpired lease.
            work = lambda: self._fetch_prepare(partitions, exclude, limit, paused)  # noqa: E731
            self._submit("fetch", work, now)
            return False
        # Nothing in flight to overlap with: no thread hand-off (latency). Due
        # marks ride along in the same round trip and transaction: at a low rate
        # a mark on the second connection would compete with this fetch.
        job = _Job(Future(), "fetch", now, self._generation)
        carried = self._to_mark if self._marks_due(now) else {}
        rows, messages = self._fetch_prepare(partitions, exclude, limit, paused, carried)
        if carried:
            self._to_mark = {}
        self._fetched(job, rows, messages)
        return True

    def _may_fetch(self) -> bool:
        if self._suspects and not self._lanes:
            self._suspects.clear()  # each was confirmed, resent alone, or dropped with its key
        return (
            bool(self.partitions)
            and not self._suspects
            and self._lanes.queued <= self.settings.batch_size // 2
        )

    def _fetch_wanted(self, now: float) -> bool:
        # Top up once the lanes are down to half a batch: a key with a deep
        # backlog is sent one message per round trip, and the fetch goes on
        # meanwhile only while that leaves room for other keys' rows.
        if not self._may_fetch():
            return False
        return (
            self._more
            or self.wakeup.is_set()
            or now - self._fetched_at >= self.settings.poll_interval
        )

    def _fetch_prepare(
        self,
        partitions: list[int],
        exclude: list[int],
        limit: int,
        paused: list[str],
        mark: dict[int, str] | None = None,
    ) -> tuple[list[EventRow], list[OutgoingMessage]]:
        rows = self.store.mark_and_fetch(
            list(mark or ()),
            partitions,
            limit,
            exclude,
            owner=self.relay_id,
            delete_rows=self.settings.delete_on_delivery,
            skip_keys=paused,
            mark_ids=list(mark.values()) if mark else None,
        )
        return rows, self._prepare(rows)

    def _fetched(self, job: _Job, rows: list[EventRow], messages: list[OutgoingMessage]) -> None:
        limit = self.settings.batch_size
        if job.generation != self._generation:
            self._more = True  # fetched against lanes since cleared: fetch again
            return
        self._more = len(rows) >= limit or bool(job.dropped_keys)
        dropped = job.dropped_keys
        for message in messages:
            key = message.ordering_key
            if key in dropped or key in self._paused:
                continue  # refetched once the key may go on, in order
            self._lanes.add(message)

    def _drop_key(self, key: str) -> None:
        """Forget the key's lane; a fetch under way drops its rows too (refetched later)."""
        self._lanes.drop(key)
        if self._job is not None:
            self._job.dropped_keys.add(key)
        self._more = True

    def _clear_lanes(self) -> None:
        self._lanes.clear()
        self._generation += 1
        self._more = True
        self._suspects.clear()
        self._nacks.clear()

    # -- the window ------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self.publisher.connect()
        except PublishError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        self._broker_log.recovered("broker reachable again")
        self._observe("broker_connected", True)

    def _stand_down(self) -> None:
        """The broker is out of reach: hand this relay's partitions to its peers now.

        Held, they would stall until the leases ran out, and the next
        rebalance would claim them back while the broker is still out of
        reach: a relay cut off from the broker alone (its peers reach it)
        would stall its share of the keys again and again. Released, a peer
        takes them at its next rebalance. Nothing is out (the caller settled
        or forgot the window), and what was confirmed is marked first, so the
        peer resends nothing this relay got confirms for. Until a connection
        opens again this relay claims nothing (``_maybe_rebalance``).
        """
        self._stood_down = True
        if not self._registered:
            return
        released = sorted(self._held)
        # Nothing of these partitions is sent from here on, whatever the release's fate:
        # a fetch in flight lands first, then the lanes and the local lease are dropped.
        with contextlib.suppress(OutboxError):
            self._finish_job(wait=True)
        self._forget_lease()
        try:
            self._finish_marking(wait=True)
            self._mark(self._to_mark)
            self.store.release(self.relay_id)
            partition_count = self.store.partition_count()
        except OutboxError as exc:  # the database is out of reach too: the leases run out
            emit(log, "relay_error", "%s", exc, level=logging.ERROR)
            return
        emit(
            log,
            "relay_stood_down",
            "broker out of reach: relay %s released partitions %s to its peers",
            self.relay_id,
            released,
            partitions=released,
        )
        self._observe("partitions_changed", [], partition_count)

    def _fill_window(self, now: float) -> None:
        """Send the heads of ready keys into the room the window has."""
        lanes = self._lanes
        if not lanes.has_ready or now < self._send_after or not self._lease_valid():
            return
        room = self.settings.window - lanes.out
        if room <= 0:
            return
        if self._suspects:
            if lanes.out:
                return
            batch = self._take_suspect(now)
        else:
            batch = lanes.take(room, now)
        held = self._held
        sendable: list[OutgoingMessage] = []
        for message in batch:
            if message.partition in held:
                sendable.append(message)
            else:  # given up since it was fetched (a failed send put it back)
                lanes.done(message)
                self._drop_key(message.ordering_key)
        if not sendable:
            return
        if not self.publisher.connected:
            try:
                self._connect()
            except BrokerUnavailable:
                for message in sendable:
                    lanes.put_back(message)
                raise
        self.publisher.send(sendable)

    def _take_suspect(self, now: float) -> list[OutgoingMessage]:
        for key in self._lanes.keys():  # noqa: SIM118 - a method of Lanes
            head = self._lanes.head(key)
            if head is not None and head.position in self._suspects:
                message = self._lanes.take_key(key, now)
                return [message] if message is not None else []
        self._suspects.clear()
        return self._lanes.take(1, now)

    def _expire(self, now: float) -> None:
        """Give up on the window when its oldest message waited past confirm_timeout."""
        deadline = self._confirm_deadline()
        if deadline is not None and now >= deadline:
            self._give_up_window()

    def _confirm_deadline(self) -> float | None:
        """When the oldest message out times out; None with nothing out or while blocked.

        While the broker blocks the connection (a resource alarm) it reads
        nothing, so no confirm can come: the wait is not counted, and
        reconnecting would only meet the same alarm (it is cluster-wide).
        """
        oldest = self._lanes.oldest_out()
        if oldest is None:
            return None
        since = self.publisher.confirm_clock(oldest)
        return None if since is None else since + self.settings.confirm_timeout

    def _give_up_window(self) -> None:
        """Every message out fails as ``timeout``, on a connection dropped for good."""
        self.publisher.abort(
            TIMEOUT, f"no confirm within confirm_timeout ({self.settings.confirm_timeout:g} s)"
        )
        self._settle(0.0)

    def _settle(self, timeout: float) -> None:
        """Act on every verdict the publisher has reached."""
        settled = self.publisher.settle(timeout)
        if not settled:
            return
        confirmed = settled.confirmed
        if confirmed:
            lanes = self._lanes
            oldest = lanes.oldest_out() or time.monotonic()
            for message in confirmed:
                lanes.done(message)
            if not self._to_mark:
                self._confirmed_at = time.monotonic()
            to_mark = self._to_mark
            for message in confirmed:
                to_mark[message.position] = message.message_id
            self.published_total += len(confirmed)
            self._observe("batch_published", len(confirmed), time.monotonic() - oldest)
            self._observe("events_confirmed", [m.timestamp for m in confirmed])
            self._confirmed(confirmed)
        if settled.failed:
            self._failed(settled.failed)
        elif confirmed:
            self._publish_backoff.reset()
            self._publish_log.recovered("publishing again")

    def _confirmed(self, messages: list[OutgoingMessage]) -> None:
        for message in messages:
            self._suspects.discard(message.position)
            if self._nacks:
                self._nacks.pop(message.position, None)
            if self._pause_backoff:
                self._pause_backoff.pop(message.ordering_key, None)
            if message.routing_key in self._unroutable_routes:
                self._unroutable_routes.discard(message.routing_key)
                emit(
                    log,
                    "relay_routable",
                    "routing key %r is routed again",
                    message.routing_key,
                    routing_key=message.routing_key,
                )

    def _failed(self, failures: list[Failure]) -> None:
        retry: list[OutgoingMessage] = []
        kinds: dict[str, int] = {}
        first_failure = failures[0]
        for failure in failures:
            message, kind, detail = failure.message, failure.kind, failure.detail
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == UNSENDABLE or (kind == REFUSED and failure.own):
                self._dead(message, detail, kind)
            elif kind == REFUSED:
                self._suspects.add(message.position)
                retry.append(message)
            elif kind in (NACKED, RETURNED) and self._out_of_attempts(message):
                # The broker refused this very message max_attempts times.
                attempts = self.settings.max_attempts
                self._dead(message, f"{kind} {attempts} times (max_attempts): {detail}", EXHAUSTED)
            elif kind == RETURNED:
                self._unroutable(message, detail)
            else:  # nacked, timeout, connection: the broker may take it next time
                if kind == NACKED:
                    self._nacks[message.position] = self._nacks.get(message.position, 0) + 1
                retry.append(message)
        for kind, count in kinds.items():
            self._observe("publish_failed", kind, count)
        if not self.publisher.connected:
            self._observe("broker_connected", False)
        if not retry:
            return
        for message in retry:
            self._lanes.put_back(message)
        first = min(retry, key=lambda m: m.position)
        summary = f"{first_failure.kind}: {first_failure.detail}"
        self.store.record_failure([m.position for m in retry], summary)
        if all(m.position in self._suspects for m in retry):
            return  # sent alone next, no waiting: the broker was not unwell
        self._send_after = time.monotonic() + self._publish_backoff.next_delay()
        self._publish_log.failed(
            "publish of %d messages failed (%s); resending them, first event %s",
            len(retry),
            summary,
            first.message_id,
            reason=first_failure.kind,
            event_id=first.message_id,
            key=first.ordering_key,
        )

    def _out_of_attempts(self, message: OutgoingMessage) -> bool:
        """Whether this failure is the ``max_attempts``-th of the message (0: never).

        Failures recorded in the row before this relay fetched it count, plus
        the nacks since (a nacked message is resent from memory; a returned
        one is fetched again, with its count).
        """
        limit = self.settings.max_attempts
        if not limit:
            return False
        failures = message.attempts + self._nacks.get(message.position, 0) + 1
        return failures >= limit

    def _unroutable(self, message: OutgoingMessage, detail: str) -> None:
        key = message.ordering_key
        if self.settings.unroutable == "dead":
            reason = f"unroutable: {detail}"
            self._dead(message, reason, RETURNED)
            return
        # Retry that key alone, backing off, while every other key goes on.
        backoff = self._pause_backoff.get(key)
        if backoff is None:
            backoff = self._pause_backoff[key] = Backoff(
                self.settings.backoff_initial, self.settings.backoff_max
            )
        self._paused[key] = time.monotonic() + backoff.next_delay()
        self._lanes.done(message)
        self._drop_key(key)
        self.store.record_failure([message.position], f"unroutable: {detail}")
        if message.routing_key not in self._unroutable_routes:
            self._unroutable_routes.add(message.routing_key)
            emit(
                log,
                "relay_unroutable",
                "no queue is bound for routing key %r: event %s and the rest of key %s wait, "
                "retried with backoff",
                message.routing_key,
                message.message_id,
                key,
                level=logging.WARNING,
                routing_key=message.routing_key,
                event_id=message.message_id,
                key=key,
            )

    def _resume_paused(self, now: float) -> None:
        if not self._paused:
            return
        for key in [k for k, at in self._paused.items() if at <= now]:
            del self._paused[key]
            self._more = True  # its rows were left out of the fetches meanwhile

    def _dead(self, message: OutgoingMessage, reason: str, cause: str) -> None:
        """Mark a sent row dead: the rest of its key leaves the lanes, held behind it."""
        self._lanes.done(message)
        self._mark_dead(message.position, message.ordering_key, message.message_id, reason, cause)
        self._nacks.pop(message.position, None)
        self._suspects.discard(message.position)
        self._drop_key(message.ordering_key)

    def _mark_dead(self, position: int, key: str, event_id: str, reason: str, cause: str) -> None:
        """Mark one row dead; its key is held until an operator retries or skips it.

        ``cause`` is one of the metric's causes: invalid, unroutable, exhausted,
        unsendable, refused.
        """
        self.store.mark_dead(position, reason)
        emit(
            log,
            "relay_event_dead",
            "event %s marked dead, key %s held: %s",
            event_id,
            key,
            reason,
            level=logging.ERROR,
            event_id=event_id,
            key=key,
            cause=cause,
        )
        self._observe("event_dead", key, cause)

    # -- rows into messages -------------------------------------------------------

    def _prepare(self, rows: Sequence[EventRow]) -> list[OutgoingMessage]:
        """Rows into messages; a row that cannot become one is marked dead and holds its key.

        Runs on the database thread. Whatever goes wrong with one row (its
        JSON, the envelope, its content, its headers, a length or range AMQP
        cannot carry) stays with that row.
        """
        messages: list[OutgoingMessage] = []
        held: set[str] = set()
        for row in rows:
            if row.ordering_key in held:
                continue
            try:
                messages.append(
                    message_for(row, self.settings, self.content_validator, self.body_encoder)
                )
            except NOT_THE_ROWS_FAULT:
                raise
            except Exception as exc:
                held.add(row.ordering_key)
                # Unsendable: what AMQP or the size limit cannot carry; the rest is invalid data.
                cause = UNSENDABLE if isinstance(exc, UnsendableEventError) else "invalid"
                self._mark_dead(
                    row.position, row.ordering_key, str(row.event_id), reason_of(exc), cause
                )
        if not messages:
            return messages
        unsendable = self.publisher.prepare(messages)
        if not unsendable:
            return messages
        kept: list[OutgoingMessage] = []
        for message in messages:
            key = message.ordering_key
            if key in held:
                continue
            reason = unsendable.get(message.position)
            if reason is not None:
                held.add(key)
                self._mark_dead(message.position, key, message.message_id, reason, UNSENDABLE)
                continue
            kept.append(message)
        return kept

    # -- leases -----------------------------------------------------------------

    def _lease_valid(self) -> bool:
        return time.monotonic() < self._lease_deadline

    def _maybe_rebalance(self, now: float) -> None:
        """Renew the leases every lease_ttl / 5 (and take a fair share), beside the window.

        On the database thread while messages are out: a renewal never stalls
        the window. Giving up a partition with messages of it out keeps order
        (each is its key's only message out, and its key's later rows are only
        sent by the new owner after it is confirmed or marked); the new owner
        may send it again, with its id.
        """
        if self._stood_down:
            # Claim nothing until the broker takes a connection again; this
            # raises BrokerUnavailable (and the loop backs off) while it does not.
            if not self.publisher.connected:
                self._connect()
            self._stood_down = False
            self._next_rebalance = now
        if now < self._next_rebalance or self._job is not None:
            return
        ttl = self.settings.lease_ttl
        self._next_rebalance = now + ttl / 5

        def renew() -> Lease:
            return self.store.rebalance(self.relay_id, ttl)  # also registers this relay

        if self._lanes.out:
            self._submit("rebalance", renew, now)
            return
        self._apply_lease(renew(), now)

    def _apply_lease(self, lease: Lease, asked_at: float) -> None:
        self._registered = True
        # Count the lease from before the request: the database's expiry is later.
        self._lease_deadline = asked_at + self.settings.lease_ttl * 0.8
        if lease.epochs != self._lease.epochs:
            # Queued rows may belong to partitions given up, or be stale for
            # partitions another relay published meanwhile: fetch them anew.
            self._clear_lanes()
            emit(
                log,
                "relay_partitions_changed",
                "relay %s now publishes partitions %s",
                self.relay_id,
                lease.partitions,
                partitions=lease.partitions,
            )
            self._observe("partitions_changed", lease.partitions, self.store.partition_count())
        self._lease = lease
        self._held = frozenset(lease.partitions)

    # -- shutdown and waiting ---------------------------------------------------

    def _settle_all(self) -> None:
        """Wait for the verdict of every message out, at most confirm_timeout."""
        deadline = time.monotonic() + self.settings.confirm_timeout
        while self._lanes.out:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._give_up_window()
                break
            if self.publisher.in_flight == 0 and self.publisher.fileno() is None:
                self._settle(0.0)
                break
            self._settle(min(remaining, 0.5))

    def _recover_from_error(self) -> None:
        """After an error: learn what the broker confirmed, refetch the rest from the table."""
        with contextlib.suppress(OutboxError):
            self._settle_all()
        self._lanes.forget_out()  # whatever is still out gets no verdict now
        self._clear_lanes()

    def _shutdown(self) -> None:
        for finish in (self._finish_job, self._finish_marking):
            try:
                finish(wait=True)
            except OutboxError as exc:
                emit(log, "relay_shutdown_incomplete", "%s", exc, level=logging.WARNING)
        try:
            self._recover_from_error()
            self._mark(self._to_mark)
            if self._registered:
                self.store.release(self.relay_id)
        except OutboxError as exc:
            emit(log, "relay_shutdown_incomplete", "%s", exc, level=logging.WARNING)
        finally:
            self._forget_lease()
            self._next_rebalance = 0.0
            self._paused.clear()
            self.publisher.close()
            for executor in (self._executor, self._mark_executor):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._executor = self._mark_executor = None
            if self._job_bell is not None:
                self._job_bell.close()
                self._job_bell = None

    def _forget_lease(self) -> None:
        """Hold no partition, locally: nothing queued or leased is sent from here on."""
        self._registered = False
        self._lease = Lease(epochs={})
        self._held = frozenset()
        self._lease_deadline = 0.0
        self._clear_lanes()

    def _mark_fast(self, rows: dict[int, str]) -> None:
        """Mark while relaying: one round trip, an asynchronous commit (docs/performance.md)."""
        self.store.mark_and_fetch(
            list(rows),
            [],
            0,
            delete_rows=self.settings.delete_on_delivery,
            mark_ids=list(rows.values()),
        )

    def _mark(self, rows: dict[int, str]) -> None:
        if rows:
            self.store.mark_delivered(
                list(rows),
                delete_rows=self.settings.delete_on_delivery,
                event_ids=list(rows.values()),
            )
            rows.clear()

    def _idle_timeout(self) -> float:
        now = time.monotonic()
        timeout = min(self.settings.poll_interval, max(0.0, self._next_rebalance - now))
        if self._paused:
            timeout = min(timeout, max(0.0, min(self._paused.values()) - now))
        return timeout or 0.001

    def _observe(self, hook: Hook, *args: object) -> None:
        """Call ``hook`` on every observer; one that raises is logged, and the rest still run."""
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                emit(
                    log,
                    "observer_hook_failed",
                    "observer hook %s failed",
                    hook,
                    level=logging.ERROR,
                    exc_info=True,
                    hook=hook,
                    observer=type(observer).__name__,
                )
