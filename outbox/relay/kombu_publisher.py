"""Any kombu transport, message by message, without broker confirms.

When kombu's ``publish`` returns, the transport accepted the message: weaker
than a broker confirm (see docs/guarantees.md). Each message is settled as
soon as it is sent, so the window never holds anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import kombu
from kombu import Exchange

from outbox.errors import BrokerUnavailable
from outbox.logs import emit
from outbox.redaction import redact
from outbox.relay.message import OutgoingMessage
from outbox.relay.nodes import BrokerNodes
from outbox.relay.outcome import CONNECTION, Failure, Settled

log = logging.getLogger(__name__)


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
        self.nodes = BrokerNodes(url)
        self.exchange = Exchange(exchange, type="topic", durable=True)
        self.declare_exchange = declare_exchange
        # Row exchanges by name (kombu declares each once per connection).
        self._exchanges: dict[str, Exchange] = {}
        self._connection: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._one_per_millisecond = False
        self._settled = Settled()

    @property
    def connected(self) -> bool:
        return self._producer is not None

    @property
    def in_flight(self) -> int:
        return 0

    def fileno(self) -> int | None:
        return None

    def confirm_clock(self, sent_at: float) -> float | None:
        return sent_at  # send() waits for each verdict: nothing is out between calls

    @property
    def unsettled_news(self) -> bool:
        return bool(self._settled)

    def connect(self) -> None:
        """Connect to the first broker node that answers (see :mod:`outbox.relay.nodes`)."""
        if self._producer is not None:
            return
        # Transports raise anything for a node they cannot reach.
        connection, channel = self.nodes.connect_round(self._open, (Exception,))
        self._connection = connection
        self._producer = kombu.Producer(channel, exchange=self.exchange)
        # kombu's filesystem transport orders messages by a millisecond stamp in
        # their file name: two messages in one millisecond could swap places.
        self._one_per_millisecond = connection.transport_cls == "filesystem"

    def _open(self, url: str) -> tuple[kombu.Connection, Any]:
        connection = kombu.Connection(url, transport_options=self.transport_options)
        try:
            connection.ensure_connection(max_retries=0)
            channel = connection.channel()
            if self.declare_exchange:
                self.exchange(channel).declare()
        except Exception:
            close_quietly(connection)
            raise
        return connection, channel

    def close(self) -> None:
        self._drop(lost=False)

    def _drop(self, *, lost: bool, reason: str = "") -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            close_quietly(connection)
            self.nodes.disconnected(lost=lost, reason=reason)

    def abort(self, kind: str, detail: str) -> None:
        """Nothing is ever in flight: only the connection is dropped."""
        self.close()

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]:
        # kombu serialises headers itself (JSON for most transports): nothing to
        # encode ahead, and no AMQP limits to check.
        return {}

    def keepalive(self) -> None:
        """Nothing to do: kombu's virtual transports keep no heartbeats."""

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        try:
            self.connect()
        except BrokerUnavailable as exc:
            self._settled.failed.extend(Failure(m, CONNECTION, str(exc)) for m in messages)
            return
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
                detail = redact(str(exc))
                self._drop(lost=True, reason=detail)
                self._settled.failed.extend(
                    Failure(m, CONNECTION, detail) for m in messages[index:]
                )
                return
            self._settled.confirmed.append(message)

    def settle(self, timeout: float = 0.0) -> Settled:
        settled, self._settled = self._settled, Settled()
        return settled


def _next_millisecond() -> None:
    # The same rounding as kombu's file name.
    start = round(time.monotonic() * 1000)
    while round(time.monotonic() * 1000) == start:
        time.sleep(0.0002)


def close_quietly(connection: kombu.Connection) -> None:
    try:
        connection.close()
    except Exception as exc:  # closing a broken connection may raise anything
        emit(
            log,
            "broker_close_failed",
            "ignored error while closing broker connection: %s",
            exc,
            level=logging.DEBUG,
        )
