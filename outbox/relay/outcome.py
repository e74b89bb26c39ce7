"""What the broker made of the messages a publisher sent: the verdicts.

A publisher keeps a window of sent, unconfirmed messages; as the broker
answers, each message gets one verdict: confirmed, or failed with a kind
(below, also the ``kind`` label of the publish-failure metric).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox.relay.message import OutgoingMessage

NACKED = "nacked"
RETURNED = "unroutable"
TIMEOUT = "timeout"
CONNECTION = "connection"
# The broker closed the channel over a message it will never take (406, 404, 403).
REFUSED = "refused"
# The message cannot be encoded for this connection (never sent).
UNSENDABLE = "unsendable"
# Not a publish outcome: the relay's cause for a row the broker nacked or
# returned max_attempts times.
EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class Failure:
    """One message the broker did not confirm, and why.

    ``own`` says the failure is known to be this message's own: the broker
    refused to declare its exchange, or it was alone on the channel the broker
    closed. A channel closed over one message of many fails them all as
    ``refused`` with ``own`` False: which one it was is still to find out.
    """

    message: OutgoingMessage
    kind: str
    detail: str
    own: bool = False


@dataclass(slots=True)
class Settled:
    """The verdicts reached since the last call, in the order they arrived."""

    confirmed: list[OutgoingMessage] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.confirmed or self.failed)


@dataclass(kw_only=True, slots=True)
class PublishResult:
    """How a whole batch fared (:func:`outbox.relay.publisher.publish_batch`).

    ``confirmed`` is the length of the prefix the broker confirmed;
    ``failure``/``detail`` describe the first message after it; ``failures``
    maps the index of every failed message to its kind and detail.
    """

    confirmed: int
    failure: str | None = None
    detail: str = ""
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, size: int, failures: dict[int, tuple[str, str]]) -> PublishResult:
        if not failures:
            return cls(confirmed=size)
        first = min(failures)
        kind, detail = failures[first]
        return cls(confirmed=first, failure=kind, detail=detail, failures=failures)
