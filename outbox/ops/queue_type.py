"""What type a RabbitMQ queue is (quorum, stream or classic), told over AMQP 0-9-1 alone.

AMQP 0-9-1 cannot list an exchange's bindings nor read a queue's arguments,
and the management API is not always there. But RabbitMQ answers a
``queue.declare`` of an existing queue with ``406 PRECONDITION_FAILED`` when
an argument differs, and names the argument and its current value::

    inequivalent arg 'x-max-length' for queue 'orders' in vhost '/':
    received none but current is the value '10' of type 'signedint'

So :func:`queue_type` declares the queue as a durable quorum queue and, for
each argument the broker says differs, learns its current value and declares
again, until the broker either accepts (the queue is a quorum queue with
exactly those arguments: the declare changed nothing) or says that
``x-queue-type`` (or ``durable``, which a quorum queue always is) differs,
which tells the type. A passive declare first makes sure the queue exists, so
nothing is created; only a queue deleted between the two declares would be.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import kombu

QUORUM = "quorum"
STREAM = "stream"
CLASSIC = "classic"
# Replicated to a majority of the queue's members before the broker confirms.
REPLICATED = frozenset((QUORUM, STREAM))

_MAX_PROBES = 24  # RabbitMQ 3.10 compares about 20 queue arguments
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<key>[^']+)' for queue .*: received .* but current is (?P<current>.*)$"
)
_TYPED_VALUE = re.compile(r"the value '(?P<value>.*)' of type '(?P<type>[^']+)'")
_INTEGER_TYPES = frozenset(
    ("signedint", "long", "short", "byte", "unsignedbyte", "unsignedshort", "unsignedint")
)


@dataclass(frozen=True, kw_only=True)
class QueueType:
    """``kind``: QUORUM, STREAM, CLASSIC, or None when it cannot be told (``detail``: why)."""

    name: str
    exists: bool
    kind: str | None = None
    durable: bool = True
    detail: str = ""


def queue_type(connection: kombu.Connection, name: str) -> QueueType:
    """The type of queue ``name`` on the node ``connection`` reached."""
    missing = _declare(connection, name, None, passive=True)
    if missing is not None:
        if getattr(missing, "code", None) == 404:
            return QueueType(name=name, exists=False, detail=_reply_text(missing))
        return QueueType(name=name, exists=True, detail=_reply_text(missing))
    arguments: dict[str, Any] = {"x-queue-type": QUORUM}
    for _ in range(_MAX_PROBES):
        refused = _declare(connection, name, arguments, passive=False)
        if refused is None:
            return QueueType(name=name, exists=True, kind=QUORUM)
        text = _reply_text(refused)
        match = _INEQUIVALENT.search(text) if getattr(refused, "code", None) == 406 else None
        if match is None:
            return QueueType(name=name, exists=True, detail=text)
        key, current = match["key"], match["current"].strip()
        if key == "x-queue-type":
            kind = current.strip("'")
            return QueueType(name=name, exists=True, kind=CLASSIC if kind == "none" else kind)
        if key in ("durable", "auto_delete"):
            # A quorum queue or a stream is durable and never auto-deleted: this one is classic.
            durable = not (key == "durable" and current.strip("'") == "false")
            return QueueType(name=name, exists=True, kind=CLASSIC, durable=durable)
        value = _value(current)
        if value is None:
            detail = f"argument {key!r} has a value this check cannot repeat: {current}"
            return QueueType(name=name, exists=True, detail=detail)
        if value is _ABSENT:
            arguments.pop(key, None)
        else:
            arguments[key] = value
    return QueueType(name=name, exists=True, detail="the broker kept refusing the declare")


_ABSENT = object()


def _value(current: str) -> Any:
    """A current argument value as RabbitMQ printed it; _ABSENT for none, None if unknown."""
    if current == "none":
        return _ABSENT
    typed = _TYPED_VALUE.fullmatch(current)
    if typed is None:
        return None
    value, kind = typed["value"], typed["type"]
    if kind in _INTEGER_TYPES:
        try:
            return int(value)
        except ValueError:
            return None
    if kind == "longstr":
        return value
    if kind == "bool":
        return value == "true"
    return None


def _declare(
    connection: kombu.Connection, name: str, arguments: dict[str, Any] | None, *, passive: bool
) -> BaseException | None:
    """One declare on a channel of its own (a refusal closes the channel); the refusal, if any."""
    try:
        channel = connection.channel()
    except Exception as exc:
        return exc
    try:
        channel.queue_declare(
            queue=name, durable=True, auto_delete=False, passive=passive, arguments=arguments
        )
    except Exception as exc:  # a refusal (an AMQP reply code) or a lost connection
        return exc
    with contextlib.suppress(Exception):  # a broken connection; the verdict stands
        channel.close()
    return None


def _reply_text(exc: BaseException) -> str:
    text = getattr(exc, "reply_text", None) or str(exc)
    return str(text).replace("PRECONDITION_FAILED - ", "").replace("NOT_FOUND - ", "")
