"""Sending messages to the broker: the only module that imports kombu.

Two implementations behind one role:

- :class:`AmqpPublisher` (``amqp://``, ``amqps://``, ``pyamqp://``): a whole
  ordered batch is written on one confirm-mode channel, then the broker's
  acks, nacks and returns are collected. The result is the length of the
  prefix the broker confirmed; everything after the first failure is resent
  later, in order, keeping its message id.
- :class:`KombuPublisher` (every other kombu transport): publishes message by
  message; when ``publish`` returns, the transport accepted the message, which
  is weaker than a broker confirm (see docs/guarantees.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import amqp
import kombu
from kombu import Exchange

from outbox.amqpframes import PublishEncoder, write_batch
from outbox.database import redact
from outbox.errors import BrokerUnavailable, ConfigurationError, PublishError
from outbox.message import OutgoingMessage

log = logging.getLogger(__name__)

# Failure kinds, also used as metric label values.
NACKED = "nacked"
RETURNED = "unroutable"
TIMEOUT = "timeout"
CONNECTION = "connection"

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    socket.timeout,
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
)


@dataclass(kw_only=True, slots=True)
class PublishResult:
    """How a sent batch fared: the first ``confirmed`` messages were confirmed.

    When ``confirmed`` is less than the batch size, ``failure`` says why the
    next message was not (one of the kinds above) and ``detail`` explains.
    """

    confirmed: int
    failure: str | None = None
    detail: str = ""


class Publisher(Protocol):
    """The broker seam. ``send`` writes, ``wait`` collects confirmations."""

    def connect(self) -> None: ...

    def send(self, messages: Sequence[OutgoingMessage]) -> None: ...

    def wait(self, timeout: float) -> PublishResult: ...

    def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...


def open_publisher(url: str, exchange: str, **options: Any) -> Publisher:
    """A publisher for ``url``: pipelined confirms for AMQP, plain kombu otherwise."""
    try:
        transport = kombu.Connection(url).transport_cls
    except Exception as exc:  # kombu raises KeyError/ImportError/ValueError for bad URLs
        raise ConfigurationError(f"bad broker URL {redact(url)!r}: {exc}") from None
    if transport in ("amqp", "amqps", "pyamqp"):
        return AmqpPublisher(url, exchange, **options)
    return KombuPublisher(url, exchange, **options)


def tls_options(
    url: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> dict[str, Any] | None:
    """py-amqp TLS options: verify the broker against ``ca`` (and its host name),
    present ``cert``/``key`` when the broker wants mutual TLS.

    None when nothing is configured: an ``amqps://`` URL alone then verifies the
    broker against the system's trusted CAs.
    """
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ConfigurationError("a broker client certificate needs both a cert and a key file")
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
    hostname = kombu.Connection(url).hostname
    if hostname:
        options["server_hostname"] = hostname  # py-amqp checks the host name only when set
    if ca:
        options["ca_certs"] = ca
    if cert:
        options["certfile"] = cert
        options["keyfile"] = key
    return options


@dataclass(eq=False)
class _InFlight:
    messages: Sequence[OutgoingMessage]
    first_tag: int
    # Every tag up to resolved_upto got an ack or a nack; single confirms above
    # it wait in `singles` until the gap below them closes.
    resolved_upto: int = 0
    singles: set[int] = field(default_factory=set)
    nacked_tags: set[int] = field(default_factory=set)
    returned_ids: dict[str, str] = field(default_factory=dict)
    broken: str = ""


class AmqpPublisher:
    """Pipelined publisher confirms over py-amqp (kombu's ``pyamqp`` transport)."""

    def __init__(
        self,
        url: str,
        exchange: str,
        *,
        declare_exchange: bool = True,
        connect_timeout: float = 5.0,
        heartbeat: int = 30,
        ssl: dict[str, Any] | bool | None = None,
    ) -> None:
        self.url = url
        self.exchange = exchange
        self.declare_exchange = declare_exchange
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self._connection: kombu.Connection | None = None
        self._channel: Any = None
        self._next_tag = 1
        self._inflight: _InFlight | None = None
        self._encoder: PublishEncoder | None = None
        self._ahead: tuple[PublishEncoder, Sequence[OutgoingMessage], list[bytes]] | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def connect(self) -> None:
        if self._channel is not None:
            return
        connection = kombu.Connection(
            self.url, connect_timeout=self.connect_timeout, heartbeat=self.heartbeat, ssl=self.ssl
        )
        try:
            connection.connect()
            channel = connection.channel()
            if self.declare_exchange:
                channel.exchange_declare(self.exchange, "topic", durable=True, auto_delete=False)
            channel.confirm_select()
        except _CONNECTION_ERRORS as exc:
            _close_quietly(connection)
            raise BrokerUnavailable(f"cannot reach broker {redact(self.url)}: {exc}") from None
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._connection = connection
        self._channel = channel
        self._next_tag = 1
        self._encoder = PublishEncoder(
            channel_id=channel.channel_id,
            exchange=self.exchange,
            frame_max=connection.connection.frame_max,
        )

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            _close_quietly(connection)

    def _drop(self, reason: str) -> None:
        if self._inflight is not None:
            self._inflight.broken = reason
        self.close()

    # Confirm callbacks run inside drain_events. The broker may confirm
    # several tags at once (multiple) and need not confirm in order.
    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        batch = self._inflight
        if batch is not None:
            _resolve(batch, delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        batch = self._inflight
        if batch is None:
            return
        low = max(batch.resolved_upto + 1, batch.first_tag) if multiple else delivery_tag
        batch.nacked_tags.update(range(low, delivery_tag + 1))
        _resolve(batch, delivery_tag, multiple)

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, message: Any) -> None:
        batch = self._inflight
        if batch is None:
            return
        message_id = message.properties.get("message_id")
        if message_id:
            batch.returned_ids[str(message_id)] = f"{routing_key!r}: {exc}"

    def keepalive(self) -> None:
        """While idle: read the broker's heartbeats and send ours when due.

        Without it an idle relay's connection is closed by the broker after
        two heartbeat intervals and the next batch fails once before a
        reconnect. The relay calls it between polls, never with a batch in flight.
        """
        connection = self._connection
        if connection is None or self._inflight is not None:
            return
        try:
            with contextlib.suppress(TimeoutError):  # nothing to read
                connection.drain_events(timeout=0)
            connection.heartbeat_check()
        except Exception as exc:  # a dead connection raises anything; reconnect on next send
            log.debug("broker connection lost while idle: %s", exc)
            self.close()

    def encode_ahead(self, messages: Sequence[OutgoingMessage]) -> None:
        """Encode the next batch's frames now, so ``send`` only writes them.

        The relay calls it from its database thread while this publisher waits
        for the previous batch's confirms. Used by ``send`` only for this very
        batch on the same connection; otherwise ``send`` encodes again.
        """
        encoder = self._encoder
        if encoder is not None:
            self._ahead = (encoder, messages, [encoder.encode(m) for m in messages])

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        self.connect()
        channel = self._channel
        assert channel is not None
        batch = _InFlight(
            messages=messages, first_tag=self._next_tag, resolved_upto=self._next_tag - 1
        )
        self._inflight = batch
        # One channel's frames, encoded by us and written in a few large writes
        # (outbox.amqpframes); the broker numbers them 1, 2, 3... per channel.
        amqp_connection = self._connection.connection if self._connection else None
        encoder = self._encoder
        assert amqp_connection is not None and encoder is not None
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None and ahead[0] is encoder and ahead[1] is messages:
                frames = ahead[2]
            else:
                frames = [encoder.encode(message) for message in messages]
            write_batch(amqp_connection._transport.write, frames)
            amqp_connection.bytes_sent += len(frames)  # read by py-amqp's heartbeat check
            self._next_tag += len(messages)
        except _CONNECTION_ERRORS as exc:
            self._drop(f"connection lost while publishing: {exc}")

    def wait(self, timeout: float) -> PublishResult:
        batch = self._inflight
        if batch is None:
            return PublishResult(confirmed=0)
        last_tag = batch.first_tag + len(batch.messages) - 1
        deadline = time.monotonic() + timeout
        while not batch.broken and batch.resolved_upto < last_tag:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                assert self._connection is not None
                self._connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
            except _CONNECTION_ERRORS as exc:
                self._drop(f"connection lost while waiting for confirms: {exc}")
        self._inflight = None
        return self._result(batch)

    def _result(self, batch: _InFlight) -> PublishResult:
        for index, message in enumerate(batch.messages):
            tag = batch.first_tag + index
            if tag in batch.nacked_tags:
                return PublishResult(
                    confirmed=index, failure=NACKED, detail="the broker nacked the message"
                )
            returned = batch.returned_ids.get(message.message_id)
            if returned is not None:
                return PublishResult(
                    confirmed=index,
                    failure=RETURNED,
                    detail=f"no queue is bound for routing key {returned}",
                )
            if tag > batch.resolved_upto and tag not in batch.singles:
                if batch.broken:
                    return PublishResult(confirmed=index, failure=CONNECTION, detail=batch.broken)
                # Unconfirmed after the timeout: the channel's tag sequence can
                # no longer be trusted, so start over on a fresh connection.
                self.close()
                return PublishResult(
                    confirmed=index, failure=TIMEOUT, detail="no confirm before the timeout"
                )
        return PublishResult(confirmed=len(batch.messages))


class KombuPublisher:
    """Any kombu transport; without broker confirms (see the guarantees page)."""

    def __init__(
        self,
        url: str,
        exchange: str,
        *,
        declare_exchange: bool = True,
        transport_options: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        self.transport_options = transport_options or {}
        self.url = url
        self.exchange = Exchange(exchange, type="topic", durable=True)
        self.declare_exchange = declare_exchange
        self._connection: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._one_per_millisecond = False
        self._result = PublishResult(confirmed=0)

    @property
    def connected(self) -> bool:
        return self._producer is not None

    def connect(self) -> None:
        if self._producer is not None:
            return
        try:
            connection = kombu.Connection(self.url, transport_options=self.transport_options)
            connection.connect()
            channel = connection.channel()
            if self.declare_exchange:
                self.exchange(channel).declare()
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach broker {redact(self.url)}: {exc}") from None
        self._connection = connection
        self._producer = kombu.Producer(channel, exchange=self.exchange)
        # kombu's filesystem transport orders messages by a millisecond stamp in
        # their file name: two messages in one millisecond could swap places.
        self._one_per_millisecond = connection.transport_cls == "filesystem"

    def close(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            _close_quietly(connection)

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        self.connect()
        producer = self._producer
        assert producer is not None
        for index, message in enumerate(messages):
            if self._one_per_millisecond:
                _next_millisecond()
            try:
                producer.publish(
                    message.body,
                    routing_key=message.routing_key,
                    content_type=message.content_type,
                    content_encoding="utf-8",
                    delivery_mode=2,
                    message_id=message.message_id,
                    timestamp=message.timestamp.timestamp(),
                    headers=message.headers,
                    retry=False,
                )
            except Exception as exc:
                self.close()
                self._result = PublishResult(
                    confirmed=index, failure=CONNECTION, detail=redact(str(exc))
                )
                return
        self._result = PublishResult(confirmed=len(messages))

    def wait(self, timeout: float) -> PublishResult:
        result, self._result = self._result, PublishResult(confirmed=0)
        return result


def _resolve(batch: _InFlight, delivery_tag: int, multiple: bool) -> None:
    if multiple:
        batch.resolved_upto = max(batch.resolved_upto, delivery_tag)
    else:
        batch.singles.add(delivery_tag)
    while batch.resolved_upto + 1 in batch.singles:
        batch.resolved_upto += 1
        batch.singles.discard(batch.resolved_upto)


def _next_millisecond() -> None:
    # The same rounding as kombu's file name.
    start = round(time.monotonic() * 1000)
    while round(time.monotonic() * 1000) == start:
        time.sleep(0.0002)


def _close_quietly(connection: kombu.Connection) -> None:
    try:
        connection.close()
    except Exception as exc:  # closing a broken connection may raise anything
        log.debug("ignored error while closing broker connection: %s", exc)


__all__ = [
    "CONNECTION",
    "NACKED",
    "RETURNED",
    "TIMEOUT",
    "AmqpPublisher",
    "KombuPublisher",
    "PublishError",
    "PublishResult",
    "Publisher",
    "open_publisher",
    "tls_options",
]
