"""Publisher confirms over py-amqp, with a window of unconfirmed messages.

``send`` writes messages on one confirm-mode channel and returns at once: the
messages join the window of those the broker has not confirmed yet. The
broker's acks, nacks and returns arrive on the same socket, in any grouping
(an ack may cover every tag up to its own); ``settle`` reads what arrived and
hands back each message's verdict. The caller decides how large the window
grows and which messages go into it (the relay: never two of one key).
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import amqp
import kombu
import kombu.exceptions

from outbox.errors import BrokerUnavailable, UnsendableEventError
from outbox.logs import emit
from outbox.relay.frames import PublishEncoder, write_batch
from outbox.relay.kombu_publisher import close_quietly
from outbox.relay.message import OutgoingMessage
from outbox.relay.nodes import BrokerNodes, node_tls
from outbox.relay.outcome import (
    CONNECTION,
    NACKED,
    REFUSED,
    RETURNED,
    UNSENDABLE,
    Failure,
    Settled,
)

log = logging.getLogger(__name__)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    kombu.exceptions.OperationalError,
    socket.timeout,
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
)

_DECLARE_ERRORS: tuple[type[BaseException], ...] = (BrokerUnavailable, *CONNECTION_ERRORS)
# The broker closed the channel over a message (RabbitMQ: 406, a body above its
# max_message_size; 404, its exchange does not exist; 403, no write permission).
_REFUSALS: tuple[type[BaseException], ...] = (
    amqp.exceptions.PreconditionFailed,
    amqp.exceptions.NotFound,
    amqp.exceptions.AccessRefused,
)

# py-amqp enables TCP keepalive; these probe sooner than its defaults (60 s idle,
# 9 probes 10 s apart), so a broker cut off by the network is noticed in about
# 25 s even on a connection with nothing to send.
_SOCKET_SETTINGS = {socket.TCP_KEEPIDLE: 10, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 3}

# frame_max as RabbitMQ offers it: frames encoded before a connection exists are
# encoded for it, and reused when the connection agrees (almost always).
_PROVISIONAL_FRAME_MAX = 131072
_AHEAD_LIMIT = 50_000
# Frames read per settle (see _read).
_READ_AT_ONCE = 8


class AmqpPublisher:
    """A window of publisher confirms over py-amqp (kombu's ``pyamqp`` transport)."""

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
        # The nodes of a ``;`` list, tried in turn (a single URL: a list of one).
        self.nodes = BrokerNodes(url)
        self.exchange = exchange
        self.declare_exchange = declare_exchange
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self._connection: kombu.Connection | None = None
        self._channel: Any = None
        self._next_tag = 1
        # Sent and not confirmed yet, by delivery tag (the broker numbers a
        # channel's publishes 1, 2, 3...), in the order sent.
        self._window: OrderedDict[int, OutgoingMessage] = OrderedDict()
        # Message ids the broker returned as unroutable; their ack follows.
        self._returned: dict[str, str] = {}
        self._settled = Settled()
        self._unread = False
        self._encoder: PublishEncoder | None = None
        self._provisional = PublishEncoder(
            channel_id=1, exchange=exchange, frame_max=_PROVISIONAL_FRAME_MAX
        )
        # position -> (message, encoder shape it was encoded for, frames), filled by prepare.
        self._ahead: dict[int, tuple[OutgoingMessage, tuple[int, int], bytes]] = {}
        # Row exchanges declared on this connection (declare_exchange).
        self._declared: set[str] = set()
        # While the broker blocks this connection (connection.blocked: a memory or
        # disk alarm), why and since when; and when the last block ended.
        self._blocked: tuple[str, float] | None = None
        self._unblocked_at = 0.0

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def in_flight(self) -> int:
        return len(self._window)

    def confirm_clock(self, sent_at: float) -> float | None:
        if self._blocked is not None:
            return None
        return max(sent_at, self._unblocked_at)

    def _on_blocked(self, reason: str) -> None:
        if self._blocked is None:
            self._blocked = (reason, time.monotonic())
            emit(
                log,
                "broker_blocked",
                "broker %s blocks publishing (%s): waiting, confirm timeout paused",
                self.nodes.current_label,
                reason,
                level=logging.WARNING,
                node=self.nodes.current_label,
                reason=reason,
            )

    def _on_unblocked(self) -> None:
        blocked, self._blocked = self._blocked, None
        self._unblocked_at = time.monotonic()
        if blocked is not None:
            emit(
                log,
                "broker_unblocked",
                "broker %s takes messages again after %.1f s blocked",
                self.nodes.current_label,
                self._unblocked_at - blocked[1],
                node=self.nodes.current_label,
                blocked_seconds=round(self._unblocked_at - blocked[1], 3),
            )

    def fileno(self) -> int | None:
        connection = self._connection
        if connection is None:
            return None
        sock = connection.connection.sock
        return sock.fileno() if sock is not None else None

    def connect(self) -> None:
        """Connect to the first broker node that answers (see :mod:`outbox.relay.nodes`)."""
        if self._channel is not None:
            return
        connection, channel = self.nodes.connect_round(self._open, CONNECTION_ERRORS)
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._connection = connection
        self._channel = channel
        self._next_tag = 1
        self._declared = set()
        self._returned = {}
        self._encoder = PublishEncoder(
            channel_id=channel.channel_id,
            exchange=self.exchange,
            frame_max=connection.connection.frame_max,
        )

    def _open(self, url: str) -> tuple[kombu.Connection, Any]:
        """A confirm-mode channel on the node at ``url``; nothing left open when it fails."""
        connection = kombu.Connection(
            url,
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            ssl=node_tls(self.ssl, url),
            transport_options={
                "socket_settings": _SOCKET_SETTINGS,
                "on_blocked": self._on_blocked,
                "on_unblocked": self._on_unblocked,
            },
        )
        try:
            # One attempt: kombu's connect() retries once after 2 s, a hidden
            # delay the relay's own backoff already provides.
            connection.ensure_connection(max_retries=0)
            channel = connection.channel()
            if self.declare_exchange:
                channel.exchange_declare(self.exchange, "topic", durable=True, auto_delete=False)
            channel.confirm_select()
        except CONNECTION_ERRORS:
            close_quietly(connection)
            raise
        return connection, channel

    def close(self) -> None:
        """Close the connection; what was still in flight fails as ``connection``."""
        self._drop(CONNECTION, "the connection was closed with messages in flight", lost=False)

    def abort(self, kind: str, detail: str) -> None:
        """Give up on everything in flight (each fails with ``kind``) and reconnect later.

        After a confirm timeout the channel's tag sequence can no longer be
        trusted: only a fresh connection starts it over.
        """
        self._drop(kind, detail)

    def _drop(
        self, kind: str, detail: str, *, own_if_alone: bool = False, lost: bool = True
    ) -> None:
        window, self._window = self._window, OrderedDict()
        own = own_if_alone and len(window) == 1
        self._settled.failed.extend(Failure(m, kind, detail, own) for m in window.values())
        connection, self._connection, self._channel = self._connection, None, None
        self._unread = False
        if self._blocked is not None:  # a new connection is not blocked until it is told so
            self._blocked = None
            self._unblocked_at = time.monotonic()
        if connection is not None:
            close_quietly(connection)
            # Anything but close() (an error, a confirm timeout, a refusal that
            # closed the channel) makes the next connect start at the next node.
            self.nodes.disconnected(lost=lost, reason=detail)

    # Confirm callbacks run inside drain_events. The broker may confirm
    # several tags at once (multiple) and need not confirm in order.
    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        window = self._window
        if not multiple:
            message = window.pop(delivery_tag, None)
            if message is not None:
                self._acked(message)
            return
        while window:
            tag = next(iter(window))
            if tag > delivery_tag:
                break
            self._acked(window.pop(tag))

    def _acked(self, message: OutgoingMessage) -> None:
        returned = self._returned.pop(message.message_id, None) if self._returned else None
        if returned is None:
            self._settled.confirmed.append(message)
            return
        detail = f"no queue is bound for routing key {returned}"
        self._settled.failed.append(Failure(message, RETURNED, detail))

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        window = self._window
        tags = [delivery_tag]
        if multiple:
            tags = list(itertools.takewhile(lambda tag: tag <= delivery_tag, window))
        for tag in tags:
            message = window.pop(tag, None)
            if message is not None:
                self._returned.pop(message.message_id, None)
                failure = Failure(message, NACKED, "the broker nacked the message")
                self._settled.failed.append(failure)

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, message: Any) -> None:
        message_id = message.properties.get("message_id")
        if message_id:
            self._returned[str(message_id)] = f"{routing_key!r}: {exc}"

    def keepalive(self) -> None:
        """Read the broker's heartbeats and send ours when due; safe at any time.

        Without it an idle relay's connection is closed by the broker after
        two heartbeat intervals and the next send fails once before a
        reconnect. Verdicts read meanwhile wait for the next ``settle``.
        """
        connection = self._connection
        if connection is None:
            return
        try:
            self._read(0.0)
            if self._connection is not None:
                connection.heartbeat_check()
        except Exception as exc:  # a dead connection raises anything; reconnect on next send
            emit(
                log,
                "broker_connection_lost",
                "broker connection lost: %s",
                exc,
                level=logging.DEBUG,
            )
            self._drop(CONNECTION, f"connection lost: {exc}")

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]:
        """Encode the messages' frames now, so ``send`` only writes them.

        The relay calls it from its database thread while this publisher's
        window is in flight. Returns the positions of the messages AMQP cannot
        carry, with the reason; they are never sent.
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
        the broker's words. A refusal closes the channel (and with it, the
        window), so the publisher reconnects and goes on with the others.
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
                # The node is fine (it answered): reconnect to it, no failover.
                detail = f"channel closed declaring exchange {name!r}: {exc}"
                self._drop(CONNECTION, detail, lost=False)
                self.connect()  # BrokerUnavailable if it cannot: the caller handles that
                self._declared.update(declared)  # they exist: declared on the old connection
                continue
            self._declared.add(name)
            declared.append(name)
        return refused

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        """Write ``messages`` and return; their verdicts come from :meth:`settle`.

        Every message gets exactly one verdict, also when the connection is
        lost while writing (``connection``) or a message cannot be sent at all.
        """
        try:
            self.connect()
        except BrokerUnavailable as exc:
            self._settled.failed.extend(Failure(m, CONNECTION, str(exc)) for m in messages)
            return
        refused: dict[str, str] = {}
        if self.declare_exchange and any(m.exchange is not None for m in messages):
            try:
                refused = self._declare_exchanges(messages)
            except _DECLARE_ERRORS as exc:
                detail = f"connection lost while declaring exchanges: {exc}"
                self._drop(CONNECTION, detail)
                self._settled.failed.extend(Failure(m, CONNECTION, detail) for m in messages)
                return
        connection = self._connection
        encoder = self._encoder
        assert connection is not None and encoder is not None
        window = self._window
        frames: list[bytes] = []
        for message in messages:
            if refused and message.exchange in refused:
                self._ahead.pop(message.position, None)
                failure = Failure(message, REFUSED, refused[message.exchange], own=True)
                self._settled.failed.append(failure)
                continue
            try:
                frames.append(self._frames(encoder, message))
            except UnsendableEventError as exc:  # a smaller frame_max than prepare assumed
                self._settled.failed.append(Failure(message, UNSENDABLE, str(exc), own=True))
                continue
            window[self._next_tag] = message
            self._next_tag += 1
        amqp_connection = connection.connection
        try:
            write_batch(amqp_connection.transport.write, frames)
            amqp_connection.bytes_sent += len(frames)  # read by py-amqp's heartbeat check
        except CONNECTION_ERRORS as exc:
            self._drop(CONNECTION, f"connection lost while publishing: {exc}")

    def settle(self, timeout: float = 0.0) -> Settled:
        """The verdicts reached since the last call.

        Reads what the broker sent; when nothing has been settled and
        messages are in flight, waits up to ``timeout`` seconds for the first
        answer. Never blocks with nothing in flight.
        """
        if self._window and not self._settled:
            self._read(0.0 if self._unread else timeout)
        settled, self._settled = self._settled, Settled()
        return settled

    @property
    def unsettled_news(self) -> bool:
        """Whether :meth:`settle` has verdicts or unread frames for the caller right now."""
        return bool(self._settled) or self._unread

    def _read(self, timeout: float) -> None:
        """Process the frames the broker has sent, waiting up to ``timeout`` for one.

        At most _READ_AT_ONCE frames: while confirms stream in, reading until
        none is left would let the window run empty before anything new is
        sent. What is left is read next time (``unsettled_news`` says so: TLS
        may hold decrypted frames that ``select`` cannot see).
        """
        connection = self._connection
        if connection is None:
            return
        wait = timeout
        self._unread = False
        try:
            for _ in range(_READ_AT_ONCE):
                if self._connection is None:
                    return
                try:
                    connection.drain_events(timeout=wait)
                except TimeoutError:
                    return
                wait = 0.0
            self._unread = True
        except _REFUSALS as exc:
            detail = f"the broker refused a message: {exc}"
            self._drop(REFUSED, detail, own_if_alone=True, lost=False)
        except CONNECTION_ERRORS as exc:
            self._drop(CONNECTION, f"connection lost while waiting for confirms: {exc}")


def _shape(encoder: PublishEncoder) -> tuple[int, int]:
    return (encoder.channel_id, encoder.body_chunk)
