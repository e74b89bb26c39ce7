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
import kombu.exceptions
from kombu import Exchange

from outbox.errors import (
    BrokerUnavailable,
    ConfigurationError,
    PublishError,
    UnsendableEventError,
)
from outbox.redaction import SecretUrl, describe_url, redact, redact_error, register_secrets_in
from outbox.relay.frames import PublishEncoder, write_batch
from outbox.relay.message import OutgoingMessage

log = logging.getLogger(__name__)

# Failure kinds, also used as metric label values.
NACKED = "nacked"
RETURNED = "unroutable"
TIMEOUT = "timeout"
CONNECTION = "connection"
# The broker closed the channel over a message it will never take (406).
REFUSED = "refused"
# The message cannot be encoded for this connection (never sent).
UNSENDABLE = "unsendable"
# Not a publish outcome: the relay's cause for a row the broker nacked or
# returned max_attempts times.
EXHAUSTED = "exhausted"

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    kombu.exceptions.OperationalError,
    socket.timeout,
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
)

_DECLARE_ERRORS: tuple[type[BaseException], ...] = (BrokerUnavailable, *_CONNECTION_ERRORS)


@dataclass(kw_only=True, slots=True)
class PublishResult:
    """How a sent batch fared.

    ``acked`` holds the index of every message the broker confirmed, wherever
    it sits in the batch; ``failures`` maps every other index to its failure
    kind (one of the kinds above) and an explanation. ``confirmed`` is the
    length of the confirmed prefix, and ``failure``/``detail`` describe the
    first message after it. ``refused_alone`` holds the indices of ``refused``
    failures known to be the message's own (the broker refused to declare its
    exchange): unlike a channel the broker closed over one message of many,
    nothing is left to find out by sending them alone.
    """

    confirmed: int
    failure: str | None = None
    detail: str = ""
    acked: frozenset[int] = frozenset()
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)
    refused_alone: frozenset[int] = frozenset()

    @classmethod
    def of(
        cls,
        size: int,
        failures: dict[int, tuple[str, str]],
        refused_alone: frozenset[int] = frozenset(),
    ) -> PublishResult:
        """The result for ``size`` messages of which those in ``failures`` failed."""
        acked = frozenset(i for i in range(size) if i not in failures)
        if not failures:
            return cls(confirmed=size, acked=acked)
        first = min(failures)
        kind, detail = failures[first]
        return cls(
            confirmed=first,
            failure=kind,
            detail=detail,
            acked=acked,
            failures=failures,
            refused_alone=refused_alone,
        )


class Publisher(Protocol):
    """The broker seam: everything the relay calls.

    ``prepare`` runs on the relay's database thread ahead of ``send``: it
    encodes what it can and names the messages that can never be sent (by
    position, with the reason). ``send`` writes; ``wait`` collects the broker's
    verdicts. ``keepalive`` is called between polls, never with a batch in
    flight.
    """

    def connect(self) -> None: ...

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]: ...

    def send(self, messages: Sequence[OutgoingMessage]) -> None: ...

    def wait(self, timeout: float) -> PublishResult: ...

    def keepalive(self) -> None: ...

    def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...


# Transports whose messages never leave the relay's process: a relay marking
# rows delivered to them would lose every event.
IN_PROCESS_TRANSPORTS = frozenset(("memory",))

# py-amqp enables TCP keepalive; these probe sooner than its defaults (60 s idle,
# 9 probes 10 s apart), so a broker cut off by the network is noticed in about
# 25 s even on a connection with nothing to send.
_SOCKET_SETTINGS = {socket.TCP_KEEPIDLE: 10, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 3}


def open_publisher(
    url: str, exchange: str, *, allow_in_process: bool = False, **options: Any
) -> Publisher:
    """A publisher for ``url``: pipelined confirms for AMQP, plain kombu otherwise.

    A transport that cannot deliver outside this process (``memory://``) is
    refused unless ``allow_in_process`` (tests of code that only needs a sink).
    """
    register_secrets_in(url)  # hidden in every error, also for callers that did not resolve
    try:
        transport = kombu.Connection(url).transport_cls
    except Exception as exc:  # kombu raises KeyError/ImportError/ValueError for bad URLs
        raise ConfigurationError(
            f"bad broker URL {describe_url(url)!r}: {redact_error(str(exc), url)}"
        ) from None
    if transport in IN_PROCESS_TRANSPORTS and not allow_in_process:
        raise ConfigurationError(
            f"broker URL {redact(url)!r} uses kombu's in-process {transport!r} transport: "
            "messages would never leave the relay, yet their rows would be marked "
            "delivered; use amqp:// (RabbitMQ) or another transport in docs/guarantees.md"
        )
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


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """Where the relay publishes: the broker URL, the exchange, the TLS files (PEM).

    ``url`` is kept as a :class:`~outbox.redaction.SecretUrl`, so ``repr()``
    never shows its password; None when the command was given none.
    """

    url: str | None
    exchange: str
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None

    def __post_init__(self) -> None:
        if self.url is not None and not isinstance(self.url, SecretUrl):
            object.__setattr__(self, "url", SecretUrl(self.url))

    def tls(self) -> dict[str, Any] | None:
        """The py-amqp TLS options of :func:`tls_options`; None without a URL or TLS files.

        The relay and ``outbox check`` both connect with these, so they agree.
        """
        if self.url is None:
            return None
        return tls_options(self.url, ca=self.ssl_ca, cert=self.ssl_cert, key=self.ssl_key)


@dataclass(eq=False)
class _InFlight:
    messages: Sequence[OutgoingMessage]
    # The delivery tag of each message; None for one that was not sent (see `failed`).
    tags: list[int | None]
    first_tag: int
    # Every tag up to resolved_upto got an ack or a nack; single confirms above
    # it wait in `singles` until the gap below them closes.
    resolved_upto: int = 0
    singles: set[int] = field(default_factory=set)
    nacked_tags: set[int] = field(default_factory=set)
    returned_ids: dict[str, str] = field(default_factory=dict)
    # Messages not sent, for a failure known before writing: (kind, detail) by index.
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)
    broken: str = ""
    refused: bool = False  # the broker closed the channel over a message (406)

    @property
    def last_tag(self) -> int:
        sent = [t for t in self.tags if t is not None]
        return sent[-1] if sent else self.first_tag - 1

    def is_resolved(self, tag: int) -> bool:
        return tag <= self.resolved_upto or tag in self.singles


# frame_max as RabbitMQ offers it: frames encoded before a connection exists are
# encoded for it, and reused when the connection agrees (almost always).
_PROVISIONAL_FRAME_MAX = 131072
_AHEAD_LIMIT = 20_000


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
        self._provisional = PublishEncoder(
            channel_id=1, exchange=exchange, frame_max=_PROVISIONAL_FRAME_MAX
        )
        # position -> (message, encoder it was encoded for, frames), filled by prepare.
        self._ahead: dict[int, tuple[OutgoingMessage, tuple[int, int], bytes]] = {}
        # Row exchanges declared on this connection (declare_exchange).
        self._declared: set[str] = set()

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def connect(self) -> None:
        if self._channel is not None:
            return
        connection = kombu.Connection(
            self.url,
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            ssl=self.ssl,
            transport_options={"socket_settings": _SOCKET_SETTINGS},
        )
        try:
            # One attempt: kombu's connect() retries once after 2 s, a hidden
            # delay the relay's own backoff already provides.
            connection.ensure_connection(max_retries=0)
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
        self._declared = set()
        self._encoder = PublishEncoder(
            channel_id=channel.channel_id,
            exchange=self.exchange,
            frame_max=connection.connection.frame_max,
        )

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            _close_quietly(connection)

    def _drop(self, reason: str, *, refused: bool = False) -> None:
        if self._inflight is not None:
            self._inflight.broken = reason
            self._inflight.refused = refused
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

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]:
        """Encode the messages' frames now, so ``send`` only writes them.

        The relay calls it from its database thread while this publisher
        waits for the previous batch's confirms. Returns the positions of the
        messages AMQP cannot carry, with the reason; they are never sent.
        """
        encoder = self._encoder or self._provisional
        shape = _shape(encoder)
        unsendable: dict[int, str] = {}
        if len(self._ahead) > _AHEAD_LIMIT:  # messages the relay dropped unsent
            self._ahead.clear()
        for message in messages:
            try:
                frames = encoder.encode(message)
            except UnsendableEventError as exc:
                unsendable[message.position] = str(exc)
                continue
            self._ahead[message.position] = (message, shape, frames)
        return unsendable

    def _frames(self, encoder: PublishEncoder, message: OutgoingMessage) -> bytes:
        ahead = self._ahead.pop(message.position, None)
        if ahead is not None and ahead[0] is message and ahead[1] == _shape(encoder):
            return ahead[2]
        return encoder.encode(message)

    def _declare_exchanges(self, messages: Sequence[OutgoingMessage]) -> dict[str, str]:
        """Declare the row exchanges not declared on this connection yet.

        Returns the exchanges the broker refused (403: no configure permission
        or a reserved ``amq.`` name; 406: it exists with another type), with
        the broker's words. A refusal closes the channel, so the publisher
        reconnects and goes on with the others.
        """
        refused: dict[str, str] = {}
        declared: list[str] = []
        for message in messages:
            name = message.exchange
            if name is None or name == self.exchange or name in self._declared or name in refused:
                continue
            channel = self._channel
            assert channel is not None
            try:
                channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
            except amqp.exceptions.ChannelError as exc:
                refused[name] = f"the broker refused to declare exchange {name!r}: {exc}"
                self.close()
                self.connect()  # BrokerUnavailable if it cannot: the caller handles that
                self._declared.update(declared)  # they exist: declared on the old connection
                continue
            self._declared.add(name)
            declared.append(name)
        return refused

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        self.connect()
        refused: dict[str, str] = {}
        lost = ""
        if self.declare_exchange:
            try:
                refused = self._declare_exchanges(messages)
            except _DECLARE_ERRORS as exc:
                self.close()
                lost = f"connection lost while declaring exchanges: {exc}"
        batch = _InFlight(
            messages=messages, tags=[], first_tag=self._next_tag, resolved_upto=self._next_tag - 1
        )
        self._inflight = batch
        if lost:
            batch.failed = dict.fromkeys(range(len(messages)), (CONNECTION, lost))
            batch.tags = [None] * len(messages)
            return
        channel = self._channel
        assert channel is not None
        # One channel's frames, encoded by us and written in a few large writes
        # (outbox.relay.frames); the broker numbers them 1, 2, 3... per channel.
        amqp_connection = self._connection.connection if self._connection else None
        encoder = self._encoder
        assert amqp_connection is not None and encoder is not None
        frames: list[bytes] = []
        for index, message in enumerate(messages):
            if refused and message.exchange in refused:
                self._ahead.pop(message.position, None)
                batch.failed[index] = (REFUSED, refused[message.exchange])
                batch.tags.append(None)
                continue
            try:
                frames.append(self._frames(encoder, message))
            except UnsendableEventError as exc:  # a smaller frame_max than prepare assumed
                batch.failed[index] = (UNSENDABLE, str(exc))
                batch.tags.append(None)
                continue
            batch.tags.append(self._next_tag)
            self._next_tag += 1
        try:
            write_batch(amqp_connection.transport.write, frames)
            amqp_connection.bytes_sent += len(frames)  # read by py-amqp's heartbeat check
        except _CONNECTION_ERRORS as exc:
            self._drop(f"connection lost while publishing: {exc}")

    def wait(self, timeout: float) -> PublishResult:
        batch = self._inflight
        if batch is None:
            return PublishResult(confirmed=0)
        last_tag = batch.last_tag
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
            except (
                amqp.exceptions.PreconditionFailed,
                amqp.exceptions.NotFound,
                amqp.exceptions.AccessRefused,
            ) as exc:
                # The broker closed the channel over one of these messages
                # (RabbitMQ: 406, a body above its max_message_size; 404, its
                # exchange does not exist; 403, no write permission on it).
                self._drop(f"the broker refused a message: {exc}", refused=True)
            except _CONNECTION_ERRORS as exc:
                self._drop(f"connection lost while waiting for confirms: {exc}")
        self._inflight = None
        return self._result(batch)

    def _result(self, batch: _InFlight) -> PublishResult:
        failures: dict[int, tuple[str, str]] = {}
        timed_out = False
        for index, message in enumerate(batch.messages):
            tag = batch.tags[index]
            if tag is None:
                failures[index] = batch.failed[index]
            elif tag in batch.nacked_tags:
                failures[index] = (NACKED, "the broker nacked the message")
            elif message.message_id in batch.returned_ids:
                returned = batch.returned_ids[message.message_id]
                failures[index] = (RETURNED, f"no queue is bound for routing key {returned}")
            elif not batch.is_resolved(tag):
                if batch.broken:
                    kind = REFUSED if batch.refused else CONNECTION
                    failures[index] = (kind, batch.broken)
                else:
                    failures[index] = (TIMEOUT, "no confirm before the timeout")
                    timed_out = True
        if timed_out:
            # Unconfirmed after the timeout: the channel's tag sequence can no
            # longer be trusted, so start over on a fresh connection.
            self.close()
        alone = frozenset(i for i, (kind, _) in batch.failed.items() if kind == REFUSED)
        return PublishResult.of(len(batch.messages), failures, alone)


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
        # Row exchanges by name (kombu declares each once per connection).
        self._exchanges: dict[str, Exchange] = {}
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
            connection.ensure_connection(max_retries=0)
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

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]:
        # kombu serialises headers itself (JSON for most transports): nothing to
        # encode ahead, and no AMQP limits to check.
        return {}

    def keepalive(self) -> None:
        """Nothing to do: kombu's virtual transports keep no heartbeats."""

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        self.connect()
        producer = self._producer
        assert producer is not None
        for index, message in enumerate(messages):
            if self._one_per_millisecond:
                _next_millisecond()
            exchange, declare = self.exchange, None
            if message.exchange is not None and message.exchange != self.exchange.name:
                exchange = self._exchanges.get(message.exchange) or self._exchanges.setdefault(
                    message.exchange, Exchange(message.exchange, type="topic", durable=True)
                )
                declare = [exchange] if self.declare_exchange else None
            try:
                producer.publish(
                    message.body,
                    exchange=exchange,
                    declare=declare,
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
                detail = redact(str(exc))
                failures = dict.fromkeys(range(index, len(messages)), (CONNECTION, detail))
                self._result = PublishResult.of(len(messages), failures)
                return
        self._result = PublishResult.of(len(messages), {})

    def wait(self, timeout: float) -> PublishResult:
        result, self._result = self._result, PublishResult(confirmed=0)
        return result


def _shape(encoder: PublishEncoder) -> tuple[int, int]:
    return (encoder.channel_id, encoder.body_chunk)


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
    "REFUSED",
    "RETURNED",
    "TIMEOUT",
    "UNSENDABLE",
    "AmqpPublisher",
    "BrokerSettings",
    "KombuPublisher",
    "PublishError",
    "PublishResult",
    "Publisher",
    "open_publisher",
    "tls_options",
]
