"""The relay loop: fetch pending rows, validate, publish in order, mark delivered.

Orchestration only, over a store, a publisher and a wake-up source, so it can
be embedded and tested with fakes; signals, scheduling and configuration live
in :mod:`outbox.cli`.

Fetched rows become messages in a queue kept per ordering key. Each send is a
*wave*: the oldest queued message of every key, so that a key never has more
than one unconfirmed message on the wire. Whatever the broker does to a
message (nack, return, refusal, timeout, lost connection), nothing later of
its key was sent behind it, so first arrivals of a key are always in commit
order. One iteration overlaps database work with broker work::

    fetch more rows     | broker routes and confirms wave N
    mark wave N-1       |
    validate, encode    |
    wait for N's confirms; what the broker confirmed is marked next iteration
    send wave N+1

Rows are never marked delivered before the broker confirmed them. A message
the broker did not confirm goes back to the head of its key's queue and is
resent with its message id. A row that can never become a message (invalid,
unencodable, refused by the broker) is marked dead with the reason and holds
only its key; nothing a single row holds can stop the loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from outbox.envelope import fastcheck, limits
from outbox.envelope.jsontext import parse_json
from outbox.errors import (
    BrokerUnavailable,
    EnvelopeError,
    OutboxError,
    PublishError,
    StoreError,
    StoreUnavailable,
    UnsendableEventError,
)
from outbox.logs import emit
from outbox.relay.backoff import Backoff, FailureLog
from outbox.relay.message import CONTENT_TYPE_JSON, OutgoingMessage, build_message
from outbox.relay.observer import Hook, RelayObserver
from outbox.relay.publisher import (
    EXHAUSTED,
    NACKED,
    REFUSED,
    RETURNED,
    UNSENDABLE,
    Publisher,
    PublishResult,
)
from outbox.store.protocol import Store
from outbox.store.rows import EventRow, Lease

log = logging.getLogger(__name__)

UNROUTABLE_POLICIES = ("retry", "dead")


def parse_payload(payload: str) -> Any:
    """The stored envelope as Python values; ValueError if it is not JSON.

    The rules of :func:`outbox.envelope.jsontext.parse_json`: standard JSON
    without NaN or Infinity. The body sent is the stored text, never these
    values; they serve the checks, so they are read the fast way: an integer
    beyond 64 bits becomes a float, and content validation compares such a
    number at double precision.
    """
    return parse_json(payload, exact_integers=False)


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    batch_size: int = 500
    poll_interval: float = 1.0
    lease_ttl: float = 15.0
    confirm_timeout: float = 10.0
    unroutable: str = "retry"
    source: str = "/outbox"
    # None: the reverse-DNS name of each event's schema URI host (outbox.relay.message).
    type_prefix: str | None = None
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    delete_on_delivery: bool = False
    max_payload_bytes: int = limits.DEFAULT_MAX_PAYLOAD_BYTES
    # Nacks or returns of one event before it is marked dead; 0: retry for ever.
    max_attempts: int = 0

    def __post_init__(self) -> None:
        if self.unroutable not in UNROUTABLE_POLICIES:
            raise ValueError(f"unroutable must be one of {UNROUTABLE_POLICIES}")


class Wakeup:
    """Set when new work may exist (a NOTIFY); the loop also polls without it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


Validator = Callable[[EventRow, dict[str, object]], None]
# Returns (body, content type) to send instead of the stored JSON, or None to keep it.
BodyEncoder = Callable[[EventRow, dict[str, object]], tuple[bytes, str] | None]

# Errors that say nothing about the row being turned into a message: the
# database, the broker or the process itself failed. Everything else raised
# while building one message is that row's fault.
_NOT_THE_ROWS_FAULT: tuple[type[BaseException], ...] = (StoreError, PublishError, MemoryError)


def _key_of(message: OutgoingMessage) -> str:
    return str(message.headers["outbox-key"])


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
        self._lease_deadline = 0.0
        self._next_rebalance = 0.0
        # Prepared messages not sent yet, per ordering key, each key's in position order.
        self._queue: dict[str, deque[OutgoingMessage]] = {}
        self._queued = 0
        self._inflight: list[OutgoingMessage] = []
        self._sent_at = 0.0
        self._to_mark: list[int] = []
        # Keys whose head message no queue is bound for (unroutable=retry): key -> resume time.
        self._paused: dict[str, float] = {}
        self._pause_backoff: dict[str, Backoff] = {}
        # Keys that lost their queue in this iteration (dead or paused): rows of
        # theirs fetched meanwhile by the database thread are dropped.
        self._dropped_keys: set[str] = set()
        # Messages not confirmed when the broker refused one of a wave: sent
        # alone until the refused one is found.
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
        """Relay until ``stop`` is set, then finish the wave in flight and let go."""
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
            self._observe("store_available", False)
            self._recover_from_error()
            stop.wait(self._backoff.next_delay())
            return False
        except BrokerUnavailable as exc:
            self._broker_log.failed("%s", exc)
            self._observe("broker_connected", False)
            self._recover_from_error()
            stop.wait(self._backoff.next_delay())
            return False
        except OutboxError as exc:
            emit(log, "relay_error", "%s", exc, level=logging.ERROR)
            self._recover_from_error()
            stop.wait(self._backoff.next_delay())
            return False
        self._backoff.reset()
        self._store_log.recovered("database reachable again")
        self._observe("store_available", True)
        self._observe("loop_ticked")
        if idle and wait_when_idle:
            self.publisher.keepalive()  # broker heartbeats: an idle connection stays open
            self.wakeup.wait(self._idle_timeout())
        return idle

    def _step(self) -> bool:
        """One iteration; True when there was nothing to do.

        The database work (mark wave N-1, fetch and prepare more rows) runs on
        the relay's database thread while this thread waits for the broker to
        confirm wave N: they overlap instead of alternating. Both threads block
        in socket calls most of the time, which release the GIL. With nothing
        in flight there is nothing to overlap, and this thread does it itself.
        """
        self._maybe_rebalance()
        self.wakeup.clear()
        self._resume_paused()
        self._dropped_keys.clear()
        # Top up once the queue is down to half a batch: a key with a deep
        # backlog is sent one message per wave, and the fetch goes on meanwhile
        # only while that leaves room for other keys' rows.
        limit = self.settings.batch_size if self._queued <= self.settings.batch_size // 2 else 0
        if self._suspects:
            limit = 0
        # Marks ride along with a fetch, or go alone once a batch of them is
        # due: waves of one hot key then cost no database round trip each.
        if limit or len(self._to_mark) >= self.settings.batch_size:
            to_mark, self._to_mark = self._to_mark, []
        else:
            to_mark = []
        if not limit and not to_mark:
            back_off = self._collect() if self._inflight else False
            rows: list[EventRow] = []
            messages: list[OutgoingMessage] = []
        else:
            exclude = [m.position for m in self._inflight]
            exclude += [m.position for queue in self._queue.values() for m in queue]
            back_off = False
            try:
                if not self._inflight:  # nothing to overlap with: no thread hand-off (latency)
                    rows, messages = self._mark_fetch_prepare(to_mark, exclude, limit)
                else:
                    job = self._database_thread().submit(
                        self._mark_fetch_prepare, to_mark, exclude, limit
                    )
                    try:
                        back_off = self._collect()
                    finally:
                        rows, messages = job.result()
            except BaseException:
                # Perhaps not marked (one transaction with the fetch): mark them later;
                # marking twice is harmless (only pending rows change).
                self._to_mark[:0] = to_mark
                raise
        self._enqueue(messages)
        if back_off:
            self._stop.wait(self._publish_backoff.next_delay())
            return False
        if self._queued and self._lease_valid():
            self._send_wave()
        return not rows and not self._inflight and not self._to_mark and not self._queued

    def _mark_fetch_prepare(
        self, to_mark: list[int], exclude: list[int], limit: int
    ) -> tuple[list[EventRow], list[OutgoingMessage]]:
        # Fenced: only partitions this relay holds by an unexpired lease.
        rows = self.store.mark_and_fetch(
            to_mark,
            self.partitions,
            limit,
            exclude,
            owner=self.relay_id,
            delete_rows=self.settings.delete_on_delivery,
            skip_keys=list(self._paused),
        )
        return rows, self._prepare(rows)

    def _database_thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-db")
        return self._executor

    # -- the queue and its waves ------------------------------------------------

    def _enqueue(self, messages: list[OutgoingMessage]) -> None:
        for message in messages:
            key = _key_of(message)
            if key in self._dropped_keys or key in self._paused:
                continue  # refetched once the key may go on, in order
            queue = self._queue.get(key)
            if queue is None:
                queue = self._queue[key] = deque()
            queue.append(message)
            self._queued += 1

    def _drop_key(self, key: str) -> None:
        queue = self._queue.pop(key, None)
        if queue is not None:
            self._queued -= len(queue)
        self._dropped_keys.add(key)

    def _clear_queue(self) -> None:
        self._queue.clear()
        self._queued = 0
        self._suspects.clear()
        self._nacks.clear()

    def _take_wave(self) -> list[OutgoingMessage]:
        """The oldest queued message of each key, at most a batch of them."""
        if self._suspects:
            for key, queue in self._queue.items():
                if queue[0].position in self._suspects:
                    return [self._pop_head(key)]
            self._suspects.clear()
        wave: list[OutgoingMessage] = []
        for key in list(self._queue):
            wave.append(self._pop_head(key))
            if len(wave) >= self.settings.batch_size:
                break
        return wave

    def _pop_head(self, key: str) -> OutgoingMessage:
        queue = self._queue[key]
        message = queue.popleft()
        if not queue:
            del self._queue[key]
        self._queued -= 1
        return message

    def _put_back(self, messages: list[OutgoingMessage]) -> None:
        """Unconfirmed messages return to the head of their key's queue."""
        for message in sorted(messages, key=lambda m: m.position, reverse=True):
            key = _key_of(message)
            queue = self._queue.get(key)
            if queue is None:
                queue = self._queue[key] = deque()
            queue.appendleft(message)
            self._queued += 1

    def _connect(self) -> None:
        try:
            self.publisher.connect()
        except PublishError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        self._broker_log.recovered("broker reachable again")
        self._observe("broker_connected", True)

    def _send_wave(self) -> None:
        self._connect()
        wave = self._take_wave()
        self._sent_at = time.monotonic()
        self._inflight = wave
        self.publisher.send(wave)

    def _collect(self) -> bool:
        """Wait for the wave in flight and act on each message's fate.

        Confirmed messages are queued for marking, wherever they sit in the
        wave: each is the only unconfirmed message of its key. Returns True
        when the relay should back off before sending again.
        """
        wave, self._inflight = self._inflight, []
        result = self.publisher.wait(self.settings.confirm_timeout)
        confirmed = [wave[i] for i in sorted(result.acked)]
        self._to_mark.extend(m.position for m in confirmed)
        self.published_total += len(confirmed)
        if confirmed:
            self._observe("batch_published", len(confirmed), time.monotonic() - self._sent_at)
            self._observe("events_confirmed", [m.timestamp for m in confirmed])
            self._confirmed(confirmed)
        if not result.failures:
            self._publish_backoff.reset()
            self._publish_log.recovered("publishing again")
            return False
        return self._failed(wave, result)

    def _confirmed(self, messages: list[OutgoingMessage]) -> None:
        for message in messages:
            self._suspects.discard(message.position)
            if self._nacks:
                self._nacks.pop(message.position, None)
            if self._pause_backoff:
                self._pause_backoff.pop(_key_of(message), None)
            if message.routing_key in self._unroutable_routes:
                self._unroutable_routes.discard(message.routing_key)
                emit(
                    log,
                    "relay_routable",
                    "routing key %r is routed again",
                    message.routing_key,
                    routing_key=message.routing_key,
                )

    def _failed(self, wave: list[OutgoingMessage], result: PublishResult) -> bool:
        retry: list[OutgoingMessage] = []
        kinds: dict[str, int] = {}
        for index, (kind, detail) in sorted(result.failures.items()):
            message = wave[index]
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == UNSENDABLE or (
                kind == REFUSED and (len(wave) == 1 or index in result.refused_alone)
            ):
                self._dead(message.position, _key_of(message), message.message_id, detail, kind)
            elif kind == REFUSED:
                self._suspects.add(message.position)
                retry.append(message)
            elif kind in (NACKED, RETURNED) and self._out_of_attempts(message):
                # The broker refused this very message max_attempts times.
                attempts = self.settings.max_attempts
                reason = f"{kind} {attempts} times (max_attempts): {detail}"
                self._dead(
                    message.position, _key_of(message), message.message_id, reason, EXHAUSTED
                )
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
            return False
        self._put_back(retry)
        first = min(retry, key=lambda m: m.position)
        self.store.record_failure([m.position for m in retry], f"{result.failure}: {result.detail}")
        if all(m.position in self._suspects for m in retry):
            return False  # sent alone next, no waiting: the broker was not unwell
        self._publish_log.failed(
            "publish of %d of %d messages failed (%s: %s); resending them, first event %s",
            len(retry),
            len(wave),
            result.failure,
            result.detail,
            first.message_id,
            reason=result.failure,
            event_id=first.message_id,
            key=_key_of(first),
        )
        return True

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
        key = _key_of(message)
        if self.settings.unroutable == "dead":
            reason = f"unroutable: {detail}"
            self._dead(message.position, key, message.message_id, reason, RETURNED)
            return
        # Retry that key alone, backing off, while every other key goes on.
        backoff = self._pause_backoff.get(key)
        if backoff is None:
            backoff = self._pause_backoff[key] = Backoff(
                self.settings.backoff_initial, self.settings.backoff_max
            )
        self._paused[key] = time.monotonic() + backoff.next_delay()
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

    def _resume_paused(self) -> None:
        if not self._paused:
            return
        now = time.monotonic()
        for key in [k for k, at in self._paused.items() if at <= now]:
            del self._paused[key]

    def _dead(self, position: int, key: str, event_id: str, reason: str, cause: str) -> None:
        """Mark a sent row dead: the rest of its key leaves the queue, held behind it."""
        self._mark_dead(position, key, event_id, reason, cause)
        self._nacks.pop(position, None)
        self._drop_key(key)

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

    def _mark(self, positions: list[int]) -> None:
        if positions:
            self.store.mark_delivered(positions, delete_rows=self.settings.delete_on_delivery)
            positions.clear()

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
                messages.append(self._message_for(row))
            except _NOT_THE_ROWS_FAULT:
                raise
            except Exception as exc:
                held.add(row.ordering_key)
                # Unsendable: what AMQP or the size limit cannot carry; the rest is invalid data.
                cause = UNSENDABLE if isinstance(exc, UnsendableEventError) else "invalid"
                self._mark_dead(
                    row.position, row.ordering_key, str(row.event_id), _reason(exc), cause
                )
        if not messages:
            return messages
        unsendable = self.publisher.prepare(messages)
        if not unsendable:
            return messages
        kept: list[OutgoingMessage] = []
        for message in messages:
            key = _key_of(message)
            if key in held:
                continue
            reason = unsendable.get(message.position)
            if reason is not None:
                held.add(key)
                self._mark_dead(message.position, key, message.message_id, reason, UNSENDABLE)
                continue
            kept.append(message)
        return kept

    def _message_for(self, row: EventRow) -> OutgoingMessage:
        try:
            data = parse_payload(row.payload)
        except (ValueError, RecursionError) as exc:  # Recursion: nested too deeply
            raise EnvelopeError(f"invalid JSON: {exc}") from None
        fastcheck.check_envelope(data)
        if self.content_validator is not None:
            self.content_validator(row, data)
        encoded = self.body_encoder(row, data) if self.body_encoder else None
        body, content_type = encoded or (None, CONTENT_TYPE_JSON)
        message = build_message(
            row,
            data["action"],
            data["resource"]["schema"],
            source=self.settings.source,
            type_prefix=self.settings.type_prefix,
            body=body,
            content_type=content_type,
        )
        limits.check_payload_size(len(message.body), self.settings.max_payload_bytes)
        return message

    # -- leases -----------------------------------------------------------------

    def _lease_valid(self) -> bool:
        return time.monotonic() < self._lease_deadline

    def _maybe_rebalance(self) -> None:
        now = time.monotonic()
        if now < self._next_rebalance:
            return
        ttl = self.settings.lease_ttl
        if self._inflight:
            self._collect()  # never release a partition with messages in flight
        self._mark(self._to_mark)
        lease = self.store.rebalance(self.relay_id, ttl)  # also registers this relay
        self._registered = True
        # Count the lease from before the request: the database's expiry is later.
        self._lease_deadline = now + ttl * 0.8
        self._next_rebalance = now + ttl / 5
        if lease.epochs != self._lease.epochs:
            # Queued rows may belong to partitions given up, or be stale for
            # partitions another relay published meanwhile: fetch them anew.
            self._clear_queue()
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

    # -- shutdown and waiting ---------------------------------------------------

    def _recover_from_error(self) -> None:
        """After an error: learn what the broker confirmed, refetch the rest from the table."""
        if self._inflight:
            try:
                self._collect()
            except OutboxError:
                self._inflight = []
        self._clear_queue()

    def _shutdown(self) -> None:
        try:
            self._recover_from_error()
            self._mark(self._to_mark)
            if self._registered:
                self.store.release(self.relay_id)
        except OutboxError as exc:
            emit(log, "relay_shutdown_incomplete", "%s", exc, level=logging.WARNING)
        finally:
            self._registered = False
            self._lease = Lease(epochs={})
            self._lease_deadline = 0.0
            self._next_rebalance = 0.0
            self._clear_queue()
            self._paused.clear()
            self.publisher.close()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EnvelopeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
