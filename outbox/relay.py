"""The relay loop: fetch pending rows, validate, publish in order, mark delivered.

Orchestration only, over a store, a publisher and a wake-up source, so it can
be embedded and tested with fakes; signals, scheduling and configuration live
in :mod:`outbox.cli`.

One iteration overlaps database work with broker work::

    fetch batch N+1  | broker routes and confirms batch N
    mark batch N-1   |
    validate N+1     |
    wait for N's confirms; N's confirmed prefix is marked next iteration
    send N+1

Rows are never marked delivered before the broker confirmed them, and a batch
cut short (nack, unroutable, timeout, lost connection) is resent from its first
unconfirmed row, in position order, keeping each message id.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from outbox import fastcheck
from outbox.errors import EnvelopeError, OutboxError, PublishError, StoreUnavailable
from outbox.logs import emit
from outbox.message import CONTENT_TYPE_JSON, OutgoingMessage, build_message
from outbox.observer import RelayObserver
from outbox.publisher import RETURNED, Publisher
from outbox.store import EventRow, Lease, SqlStore

log = logging.getLogger(__name__)

UNROUTABLE_POLICIES = ("retry", "dead")


def _reject_non_json_constant(name: str) -> object:
    # Python's json accepts NaN and Infinity; consumers' parsers do not.
    raise ValueError(f"{name} is not a JSON value")


def parse_payload(payload: str) -> Any:
    """The stored envelope as Python values; ValueError if it is not JSON.

    orjson parses a 1 KiB envelope in a fifth of the stdlib's time. What it
    refuses and the stdlib accepts (lone surrogate escapes) goes to the
    stdlib, so the relay accepts exactly the documents it always has: standard
    JSON without NaN or Infinity. The body sent is the stored text, never
    these values; they serve the checks. One difference remains: orjson reads
    an integer beyond 64 bits as a float, so content validation compares such
    a number at double precision, as RFC 8259 (section 6) warns most JSON
    consumers will.
    """
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload, parse_constant=_reject_non_json_constant)


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    batch_size: int = 500
    poll_interval: float = 1.0
    lease_ttl: float = 15.0
    confirm_timeout: float = 10.0
    unroutable: str = "retry"
    source: str = "/outbox"
    type_prefix: str = ""
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    delete_on_delivery: bool = False

    def __post_init__(self) -> None:
        if self.unroutable not in UNROUTABLE_POLICIES:
            raise ValueError(f"unroutable must be one of {UNROUTABLE_POLICIES}")


class BrokerUnavailable(PublishError):
    """The broker cannot be reached; the batch was not sent, its rows stay pending."""


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


class Relay:
    """Publishes the pending rows of the partitions this relay leases."""

    def __init__(
        self,
        store: SqlStore,
        publisher: Publisher,
        settings: RelaySettings | None = None,
        *,
        wakeup: Wakeup | None = None,
        observer: RelayObserver | None = None,
        content_validator: Validator | None = None,
        body_encoder: BodyEncoder | None = None,
        relay_id: str | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings or RelaySettings()
        self.wakeup = wakeup or Wakeup()
        self.observer = observer or RelayObserver()
        self.content_validator = content_validator
        self.body_encoder = body_encoder
        self.relay_id = relay_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = Lease(epochs={})
        self._lease_deadline = 0.0
        self._next_rebalance = 0.0
        self._inflight: list[OutgoingMessage] = []
        self._sent_at = 0.0
        self._to_mark: list[int] = []
        self._backoff = 0.0
        self._registered = False
        self._stop = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self.published_total = 0
        self._probing = False  # fetch one row at a time while a message is unroutable

    # -- public ---------------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        return self._lease.partitions if self._lease_valid() else []

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, then finish the batch in flight and let go."""
        emit(log, "relay_started", "relay %s started", self.relay_id, relay_id=self.relay_id)
        self._stop = stop
        try:
            while not stop.is_set():
                self._step_safely(stop)
        finally:
            self._shutdown()
        emit(log, "relay_stopped", "relay %s stopped", self.relay_id, relay_id=self.relay_id)

    def drain(self, timeout: float = 60.0) -> int:
        """Publish until no pending row is left in owned partitions; return how many."""
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
            self._backoff = 0.0
            self.observer.store_available(True)
        except StoreUnavailable as exc:
            emit(log, "relay_store_unavailable", "%s", exc, level=logging.WARNING)
            self.observer.store_available(False)
            self._settle_inflight()
            self._sleep(stop)
            return False
        except BrokerUnavailable as exc:
            emit(log, "relay_broker_unavailable", "%s", exc, level=logging.WARNING)
            self.observer.broker_connected(False)
            self._sleep(stop)
            return False
        except OutboxError as exc:
            emit(log, "relay_error", "%s", exc, level=logging.ERROR)
            self._settle_inflight()
            self._sleep(stop)
            return False
        self._observe(self.observer.loop_ticked)
        if idle and wait_when_idle:
            keepalive = getattr(self.publisher, "keepalive", None)
            if keepalive is not None:
                keepalive()  # broker heartbeats: an idle connection stays open
            self.wakeup.wait(self._idle_timeout())
        return idle

    def _step(self) -> bool:
        """One iteration; True when there was nothing to do.

        The database work (mark N-1, fetch and validate N+1) runs on the
        relay's database thread while this thread waits for the broker to
        confirm N: they overlap instead of alternating. Both threads block in
        socket calls most of the time, which release the GIL. With nothing in
        flight there is nothing to overlap, and this thread does it itself.
        """
        self._maybe_rebalance()
        self.wakeup.clear()
        exclude = [m.position for m in self._inflight]
        to_mark, self._to_mark = self._to_mark, []
        confirmed = True
        try:
            if not self._inflight:  # nothing to overlap with: no thread hand-off (latency)
                rows, messages = self._mark_fetch_prepare(to_mark, exclude)
            else:
                job = self._database_thread().submit(self._mark_fetch_prepare, to_mark, exclude)
                try:
                    confirmed = self._collect()
                finally:
                    rows, messages = job.result()
        except BaseException:
            # Perhaps not marked (one transaction with the fetch): mark them later;
            # marking twice is harmless (only pending rows change).
            self._to_mark[:0] = to_mark
            raise
        if not confirmed:
            return False  # cut short: resend from the first unconfirmed row, refetched
        if messages and self._lease_valid():
            self._send(messages)
        return not rows and not self._inflight and not self._to_mark

    def _mark_fetch_prepare(
        self, to_mark: list[int], exclude: list[int]
    ) -> tuple[list[EventRow], list[OutgoingMessage]]:
        # Fenced: only partitions this relay holds by an unexpired lease.
        rows = self.store.mark_and_fetch(
            to_mark,
            self.partitions,
            1 if self._probing else self.settings.batch_size,
            exclude,
            owner=self.relay_id,
            delete_rows=self.settings.delete_on_delivery,
        )
        messages = self._prepare(rows)
        encode_ahead = getattr(self.publisher, "encode_ahead", None)
        if messages and encode_ahead is not None:
            encode_ahead(messages)  # off this thread's critical path: the broker is busy
        return rows, messages

    def _database_thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-db")
        return self._executor

    def _send(self, messages: list[OutgoingMessage]) -> None:
        try:
            self.publisher.connect()
        except PublishError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        self.observer.broker_connected(True)
        self._sent_at = time.monotonic()
        self.publisher.send(messages)
        self._inflight = messages

    def _collect(self) -> bool:
        """Wait for the batch in flight; queue its confirmed prefix for marking."""
        batch, self._inflight = self._inflight, []
        result = self.publisher.wait(self.settings.confirm_timeout)
        confirmed = batch[: result.confirmed]
        self._to_mark.extend(m.position for m in confirmed)
        self.published_total += len(confirmed)
        if confirmed:
            self._observe(
                self.observer.batch_published, len(confirmed), time.monotonic() - self._sent_at
            )
        if result.failure is None:
            self._probing = False
            return True
        failed = batch[result.confirmed]
        self._observe(self.observer.publish_failed, result.failure, len(batch) - len(confirmed))
        if not self.publisher.connected:
            self.observer.broker_connected(False)
        emit(
            log,
            "relay_publish_failed",
            "publish cut short after %d of %d messages (%s: %s); resending from event %s",
            len(confirmed),
            len(batch),
            result.failure,
            result.detail,
            failed.message_id,
            level=logging.WARNING,
            reason=result.failure,
            event_id=failed.message_id,
            key=failed.headers.get("outbox-key"),
        )
        if result.failure == RETURNED and self.settings.unroutable == "dead":
            self._mark(self._to_mark)
            self.store.mark_dead(failed.position, f"unroutable: {result.detail}")
            key = str(failed.headers.get("outbox-key"))
            self._observe(self.observer.event_dead, key, "unroutable")
        else:
            # Until an unroutable message goes through, resend it alone: resending
            # the routable messages behind it on every retry would flood consumers
            # with duplicates while nobody binds a queue.
            self._probing = result.failure == RETURNED
            self.store.record_failure([failed.position], f"{result.failure}: {result.detail}")
            self._sleep(self._stop)
        return False

    def _mark(self, positions: list[int]) -> None:
        if positions:
            self.store.mark_delivered(positions, delete_rows=self.settings.delete_on_delivery)
            positions.clear()

    def _prepare(self, rows: Sequence[EventRow]) -> list[OutgoingMessage]:
        """Validate rows into messages; a row that fails is marked dead and holds its key."""
        messages: list[OutgoingMessage] = []
        held: set[str] = set()
        for row in rows:
            if row.ordering_key in held:
                continue
            try:
                data = parse_payload(row.payload)
                fastcheck.check_envelope(data)
                if self.content_validator is not None:
                    self.content_validator(row, data)
                encoded = self.body_encoder(row, data) if self.body_encoder else None
                body, content_type = encoded or (None, CONTENT_TYPE_JSON)
            except (ValueError, RecursionError, EnvelopeError) as exc:  # Recursion: too deep
                reason = str(exc) if isinstance(exc, EnvelopeError) else f"invalid JSON: {exc}"
                held.add(row.ordering_key)
                self.store.mark_dead(row.position, reason)
                emit(
                    log,
                    "relay_event_dead",
                    "event %s marked dead, key %s held: %s",
                    row.event_id,
                    row.ordering_key,
                    reason,
                    level=logging.ERROR,
                    event_id=str(row.event_id),
                    key=row.ordering_key,
                )
                self._observe(self.observer.event_dead, row.ordering_key, reason)
                continue
            messages.append(
                build_message(
                    row,
                    data["action"],
                    data["resource"]["schema"],
                    source=self.settings.source,
                    type_prefix=self.settings.type_prefix,
                    body=body,
                    content_type=content_type,
                )
            )
        return messages

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
            emit(
                log,
                "relay_partitions_changed",
                "relay %s now publishes partitions %s",
                self.relay_id,
                lease.partitions,
                partitions=lease.partitions,
            )
            self._observe(
                self.observer.partitions_changed, lease.partitions, self.store.partition_count()
            )
        self._lease = lease

    # -- shutdown and waiting ---------------------------------------------------

    def _settle_inflight(self) -> None:
        """After an error: learn what the broker confirmed, keep it for marking."""
        if self._inflight:
            try:
                self._collect()
            except OutboxError:
                self._inflight = []

    def _shutdown(self) -> None:
        try:
            self._settle_inflight()
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
            self.publisher.close()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _idle_timeout(self) -> float:
        until_rebalance = max(0.0, self._next_rebalance - time.monotonic())
        return min(self.settings.poll_interval, until_rebalance) or 0.001

    def _sleep(self, stop: threading.Event) -> None:
        self._backoff = min(
            self.settings.backoff_max, max(self.settings.backoff_initial, self._backoff * 2)
        )
        stop.wait(self._backoff)

    def _observe(self, hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            name = getattr(hook, "__name__", repr(hook))
            emit(
                log,
                "observer_hook_failed",
                "observer hook %s failed",
                name,
                level=logging.ERROR,
                exc_info=True,
                hook=name,
            )
