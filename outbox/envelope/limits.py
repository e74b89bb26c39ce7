"""What a message must satisfy to ever reach the broker, checked before it is written.

The relay turns each row into an AMQP 0-9-1 message. Some rows can never be
sent however often the relay tries: a routing key or header name over 255
bytes (AMQP short strings), a header integer outside 64 bits, a headers table
that does not fit the broker's frame, a body above the broker's size limit.
``publish`` refuses such an event with :class:`~outbox.errors.UnsendableEventError`
and writes nothing; the relay, which also reads rows written by other means,
marks such a row dead and holds only its key (docs/guarantees.md).

The limits here are the producer's, deliberately below the broker's own:

- ``DEFAULT_MAX_PAYLOAD_BYTES`` (1 MiB): RabbitMQ 3.x refuses bodies above
  128 MiB, RabbitMQ 4 above 16 MiB, and most consumers and brokers (Kafka,
  SQS) draw their line near 1 MB. An event is a change notice, not a file.
- ``MAX_HEADERS_BYTES`` (32 KiB): the producer's headers, the ordering key and
  the schema URI, which the relay repeats in its own headers; the content
  header frame must fit the broker's ``frame_max`` (128 KiB on RabbitMQ,
  4 KiB at the least a broker may negotiate).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from outbox.errors import UnsendableEventError

SHORT_STRING_BYTES = 255
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_HEADERS_BYTES = 32 * 1024
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Bytes a table entry costs besides its name and value: name length, type tag, value length.
_ENTRY_OVERHEAD = 1 + 1 + 4


def utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_short_string(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise UnsendableEventError(f"{what} must be a string, got {type(text).__name__}")
    size = utf8_length(text)
    if size > SHORT_STRING_BYTES:
        raise UnsendableEventError(
            f"{what} is {size} bytes in UTF-8; AMQP allows at most {SHORT_STRING_BYTES}: "
            f"{text[:40]!r}..."
        )


# AMQP 0-9-1's exchange-name grammar, which RabbitMQ follows for the names it declares.
_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


@functools.lru_cache(maxsize=1024)
def check_exchange_name(name: str) -> None:
    """Refuse an exchange name the broker would not take: empty, over 255 bytes, or
    with a character other than a letter, digit, hyphen, underscore, period or colon.
    """
    if not isinstance(name, str) or not name:
        raise UnsendableEventError(
            "the exchange must be a non-empty string (None publishes to the relay's exchange)"
        )
    check_short_string("the exchange", name)
    if _EXCHANGE_NAME.fullmatch(name) is None:
        raise UnsendableEventError(
            f"the exchange {name[:40]!r} may hold only letters, digits, hyphens, "
            "underscores, periods and colons"
        )


def header_value_size(name: str, value: Any) -> int:
    """The encoded size of one header value, or UnsendableEventError if it cannot be sent.

    Header values are strings, booleans, integers within 64 bits, finite
    floats, or None: what every AMQP client and the CloudEvents binding read.
    """
    if isinstance(value, str):
        return utf8_length(value)
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        check_header_integers(name, value)
        return 8
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnsendableEventError(f"header {name!r}: {value} is not a finite number")
        return 8
    raise UnsendableEventError(
        f"header {name!r}: a {type(value).__name__} cannot be sent; "
        "use a string, a number or a boolean"
    )


def check_header_integers(name: str, value: Any) -> None:
    """Refuse an integer outside 64 bits anywhere in a header value (AMQP has no wider one)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise UnsendableEventError(f"header {name!r}: integer {value} does not fit in 64 bits")
    elif isinstance(value, Mapping):
        for item in value.values():
            check_header_integers(name, item)
    elif isinstance(value, list):
        for item in value:
            check_header_integers(name, item)


def check_headers(headers: Mapping[str, Any] | None, *, repeated: int = 0) -> None:
    """Refuse headers that no broker frame can carry.

    ``repeated`` is the size of what the relay adds from the row itself (the
    ordering key, schema URI and resource type, each sent twice), counted
    against the same budget.
    """
    total = repeated
    for name, value in (headers or {}).items():
        check_short_string("a header name", name)
        total += _ENTRY_OVERHEAD + utf8_length(name) + header_value_size(name, value)
    if total > MAX_HEADERS_BYTES:
        raise UnsendableEventError(
            f"headers, ordering key and schema URI take {total} bytes; "
            f"at most {MAX_HEADERS_BYTES} fit in a message's header frame"
        )


def check_payload_size(size: int, limit: int) -> None:
    if size > limit:
        raise UnsendableEventError(
            f"the event is {size} bytes; the limit is {limit} (max_payload_bytes)"
        )
