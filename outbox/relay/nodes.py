"""Several broker URLs (kombu's ``url1;url2;url3``): which node to try next, and failovers.

kombu keeps such a list and can cycle through it, but only while it retries:
a connect with ``max_retries=0`` (the relay's: its own backoff spaces the
attempts) tries the first URL alone, every time, so a dead first node would
stop publishing for good. The publishers therefore open one kombu connection
per node themselves, in the order :class:`BrokerNodes` gives:

- start with the node of the last connection that worked (at first, the
  first URL), so every relay sticks to one node while it stays up;
- when a connection is lost (not closed by the relay), start with the node
  after it: the node that just failed is tried last;
- go round the list once per :meth:`connect_round`, one attempt per node,
  each bounded by the publisher's ``connect_timeout``; when none answers,
  :class:`~outbox.errors.BrokerUnavailable` (the relay's backoff then waits
  before the next round).

A connection on another node than the last one is a failover: one
``broker_failover`` log line (redacted URLs), and each watcher hears of it
(the relay's Prometheus metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import kombu

from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.logs import emit
from outbox.redaction import describe_url, redact

log = logging.getLogger(__name__)

T = TypeVar("T")

_TLS_SCHEMES = frozenset(("amqps",))


def split_broker_urls(url: str) -> list[str]:
    """The URLs of a ``;``-separated list, as kombu splits it (a lone URL: a list of one).

    kombu splits at every ``;``, so a password holding one must be
    percent-encoded (``%3B``) in any case. Each entry must be a whole URL:
    kombu would fill a bare host name (``amqp://a;b``) with the first URL's
    user, password and port, which hides what the relay connects to.
    """
    parts = [part.strip() for part in str(url).split(";")]
    urls = [part for part in parts if part]
    if not urls:
        raise ConfigurationError("the broker URL is empty")
    for part in urls:
        if "://" not in part:
            raise ConfigurationError(
                f"broker URL list entry {describe_url(part)!r} is not a URL: give every node "
                "a whole URL (amqp://user:password@host:port/vhost;amqp://...)"
            )
    return urls


def check_broker_urls(urls: list[str]) -> None:
    """Refuse a list that mixes transports, or TLS and plain AMQP.

    A relay that fell back from an ``amqps://`` node to an ``amqp://`` one
    would send the password in the clear to whoever made the TLS nodes
    unreachable; a list of several transports is a typo.
    """
    schemes = {u.split("://", 1)[0].lower() for u in urls}
    amqp = {"amqp", "pyamqp", "amqps"}
    if schemes <= amqp:
        if len({s in _TLS_SCHEMES for s in schemes}) > 1:
            raise ConfigurationError(
                "the broker URL list mixes amqps:// and amqp:// nodes: a failover could "
                "then connect without TLS; use amqps:// for every node (or none)"
            )
        return
    if len(schemes) > 1:
        raise ConfigurationError(
            f"the broker URL list mixes transports ({', '.join(sorted(schemes))}): "
            "every node must use the same one"
        )


def node_label(url: str) -> str:
    """``host:port`` of a node: what metrics and messages call it (no user, no password)."""
    try:
        connection = kombu.Connection(url)
        port = connection.port or connection.transport.default_port
        return f"{connection.hostname}:{port}"
    except Exception:  # a URL kombu cannot read: its redacted form still names it
        return redact(url)


def node_tls(ssl: dict[str, Any] | bool | None, url: str) -> dict[str, Any] | bool | None:
    """The TLS options for one node: the same files, the node's own host name.

    :func:`~outbox.relay.publisher.tls_options` names the host whose
    certificate is verified; with several nodes each has its own name, so each
    connection verifies its own node's. A fresh dict per connection: py-amqp's
    transport writes into the one it is given.
    """
    if not isinstance(ssl, dict):
        return ssl
    options = dict(ssl)
    if "server_hostname" in options:
        options["server_hostname"] = kombu.Connection(url).hostname
    return options


# Called with the connected node's label and whether reaching it was a
# failover; with None when the connection went away.
NodeWatcher = Callable[[str | None, bool], None]


@dataclass
class _Attempt:
    url: str
    error: str


class BrokerNodes:
    """The broker URLs of a publisher and where the next connect starts (see the module doc)."""

    def __init__(self, url: str) -> None:
        self.urls = split_broker_urls(url)
        self.labels = [node_label(u) for u in self.urls]
        self._start = 0
        self._current: int | None = None
        self._last: int | None = None  # the node of the last connection, also once lost
        self._lost_at: float | None = None
        self._lost_reason = ""
        self.failovers = 0
        self._watchers: list[NodeWatcher] = []

    @property
    def current(self) -> str | None:
        """The URL of the node connected now; None while disconnected."""
        return None if self._current is None else self.urls[self._current]

    @property
    def current_label(self) -> str:
        """``host:port`` of the node connected now (``-`` while disconnected): safe to log."""
        return "-" if self._current is None else self.labels[self._current]

    def watch(self, watcher: NodeWatcher) -> None:
        """Call ``watcher`` on every connect and loss from now on."""
        self._watchers.append(watcher)

    def order(self) -> list[int]:
        """Indexes of the nodes in the order the next round tries them."""
        n = len(self.urls)
        return [(self._start + i) % n for i in range(n)]

    def connect_round(
        self, attempt: Callable[[str], T], errors: tuple[type[BaseException], ...]
    ) -> T:
        """``attempt`` on each node in :meth:`order` until one returns; BrokerUnavailable if none.

        ``attempt`` raises one of ``errors`` for a node it cannot reach (and
        leaves nothing open behind); others propagate.
        """
        failed: list[_Attempt] = []
        for index in self.order():
            url = self.urls[index]
            try:
                result = attempt(url)
            except errors as exc:
                failed.append(_Attempt(url, redact(str(exc))))
                emit(
                    log,
                    "broker_node_unreachable",
                    "broker node %s unreachable: %s",
                    redact(url),
                    failed[-1].error,
                    level=logging.DEBUG,
                    node=redact(url),
                )
                continue
            self._connected(index, failed)
            return result
        if len(failed) == 1:
            raise BrokerUnavailable(
                f"cannot reach broker {redact(failed[0].url)}: {failed[0].error}"
            )
        tried = "; ".join(f"{redact(a.url)}: {a.error}" for a in failed)
        raise BrokerUnavailable(f"cannot reach any of {len(failed)} broker nodes ({tried})")

    def _connected(self, index: int, failed: list[_Attempt]) -> None:
        previous = self._last
        failover = previous is not None and previous != index
        self._current = self._last = self._start = index
        if failover:
            assert previous is not None
            self.failovers += 1
            down = None if self._lost_at is None else round(time.monotonic() - self._lost_at, 3)
            emit(
                log,
                "broker_failover",
                "broker connection moved from %s to %s (%s s without a connection)",
                redact(self.urls[previous]),
                redact(self.urls[index]),
                down,
                from_node=redact(self.urls[previous]),
                to_node=redact(self.urls[index]),
                down_seconds=down,
                reason=self._lost_reason or (failed[0].error if failed else ""),
                nodes_tried=len(failed) + 1,
            )
        self._lost_at = None
        self._lost_reason = ""
        self._tell(self.labels[index], failover)

    def disconnected(self, *, lost: bool, reason: str = "") -> None:
        """The connection went away: ``lost`` (an error, a timeout) or closed by the relay.

        After a loss the next round starts with the node after the lost one.
        """
        if self._current is None:
            return
        if lost and len(self.urls) > 1:
            self._start = (self._current + 1) % len(self.urls)
        if lost:
            self._lost_at = time.monotonic()
            self._lost_reason = redact(reason)
        self._current = None
        self._tell(None, False)

    def _tell(self, label: str | None, failover: bool) -> None:
        for watcher in self._watchers:
            try:
                watcher(label, failover)
            except Exception:  # observing must never stop publishing
                emit(
                    log,
                    "broker_node_watcher_failed",
                    "broker node watcher failed",
                    level=logging.ERROR,
                    exc_info=True,
                )
