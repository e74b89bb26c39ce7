"""The broker seam: the :class:`Publisher` role, and opening one for a URL.

Two implementations, the only modules that import kombu:

- :class:`~outbox.relay.amqp_publisher.AmqpPublisher` (``amqp://``,
  ``amqps://``, ``pyamqp://``): a window of unconfirmed messages on one
  confirm-mode channel; each message is settled by the broker's ack, nack or
  return.
- :class:`~outbox.relay.kombu_publisher.KombuPublisher` (every other kombu
  transport): message by message; when ``publish`` returns, the transport
  accepted the message, which is weaker than a broker confirm (see
  docs/guarantees.md).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import kombu

from outbox.errors import ConfigurationError, PublishError
from outbox.redaction import SecretUrl, describe_url, redact, redact_error, register_secrets_in
from outbox.relay.amqp_publisher import AmqpPublisher
from outbox.relay.kombu_publisher import KombuPublisher
from outbox.relay.message import OutgoingMessage
from outbox.relay.nodes import check_broker_urls, split_broker_urls
from outbox.relay.outcome import (
    CONNECTION,
    EXHAUSTED,
    NACKED,
    REFUSED,
    RETURNED,
    TIMEOUT,
    UNSENDABLE,
    Failure,
    PublishResult,
    Settled,
)


class Publisher(Protocol):
    """The broker seam: everything the relay calls.

    ``prepare`` runs on the relay's database thread ahead of ``send``: it
    encodes what it can and names the messages that can never be sent (by
    position, with the reason). ``send`` writes and returns: the messages join
    the window of those in flight. ``settle`` hands back the verdicts reached
    since its last call, waiting up to ``timeout`` for the first one while
    anything is in flight; every message sent gets exactly one verdict, also
    when the connection is lost. ``fileno`` is a descriptor that becomes
    readable when verdicts may be waiting (None: ``settle`` never needs to
    wait); ``unsettled_news`` says the caller should settle again before
    waiting on it. ``abort`` gives up on everything in flight (each fails with the
    given kind) and drops the connection. ``keepalive`` answers heartbeats; it
    may be called at any time. ``confirm_clock`` says from when a message sent
    at ``sent_at`` waits for its confirm: None while the broker blocks the
    connection (a resource alarm: it reads nothing, so no confirm can come),
    and from the end of the last block after one.
    """

    def connect(self) -> None: ...

    def prepare(self, messages: Sequence[OutgoingMessage]) -> dict[int, str]: ...

    def send(self, messages: Sequence[OutgoingMessage]) -> None: ...

    def settle(self, timeout: float = 0.0) -> Settled: ...

    def abort(self, kind: str, detail: str) -> None: ...

    def confirm_clock(self, sent_at: float) -> float | None: ...

    def fileno(self) -> int | None: ...

    def keepalive(self) -> None: ...

    def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def unsettled_news(self) -> bool:
        """``settle`` would return verdicts or read frames without waiting."""
        ...


# Transports whose messages never leave the relay's process: a relay marking
# rows delivered to them would lose every event.
IN_PROCESS_TRANSPORTS = frozenset(("memory",))


def open_publisher(
    url: str, exchange: str, *, allow_in_process: bool = False, **options: Any
) -> Publisher:
    """A publisher for ``url``: pipelined confirms for AMQP, plain kombu otherwise.

    ``url`` may list several nodes, ``url1;url2;url3`` (one transport; all
    TLS or none): see :mod:`outbox.relay.nodes` for the order they are tried in.

    A transport that cannot deliver outside this process (``memory://``) is
    refused unless ``allow_in_process`` (tests of code that only needs a sink).
    """
    register_secrets_in(url)  # hidden in every error, also for callers that did not resolve
    check_broker_urls(split_broker_urls(url))
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
    broker against the system's trusted CAs. With a list of nodes the files
    serve every node, and each connection checks its own node's host name
    (:func:`outbox.relay.nodes.node_tls`); the name set here is the first node's.
    """
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ConfigurationError("a broker client certificate needs both a cert and a key file")
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
    hostname = kombu.Connection(split_broker_urls(url)[0]).hostname
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


def publish_batch(
    publisher: Publisher, messages: Sequence[OutgoingMessage], timeout: float
) -> PublishResult:
    """Send ``messages`` and wait for all their verdicts, at most ``timeout`` seconds.

    For callers that publish a batch at a time (``outbox replay``); what the
    broker has not confirmed by then fails as ``timeout`` and the connection
    is dropped.
    """
    index = {id(m): i for i, m in enumerate(messages)}
    failures: dict[int, tuple[str, str]] = {}
    pending = len(messages)
    deadline = time.monotonic() + timeout

    def take(settled: Settled) -> int:
        """Record the batch's verdicts among ``settled``; how many there were."""
        taken = sum(id(m) in index for m in settled.confirmed)
        for failure in settled.failed:
            at = index.get(id(failure.message))
            if at is not None:
                failures[at] = (failure.kind, failure.detail)
                taken += 1
        return taken

    publisher.send(messages)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            publisher.abort(TIMEOUT, "no confirm before the timeout")
            pending -= take(publisher.settle())
            break
        pending -= take(publisher.settle(min(remaining, 1.0)))
    return PublishResult.of(len(messages), failures)


__all__ = [
    "CONNECTION",
    "EXHAUSTED",
    "NACKED",
    "REFUSED",
    "RETURNED",
    "TIMEOUT",
    "UNSENDABLE",
    "AmqpPublisher",
    "BrokerSettings",
    "Failure",
    "KombuPublisher",
    "PublishError",
    "PublishResult",
    "Publisher",
    "Settled",
    "open_publisher",
    "publish_batch",
    "tls_options",
]
