"""Reading stored and received JSON: envelopes, payloads, the rows' headers. No I/O.

One rule for every reader: standard JSON (RFC 8259) as Python's ``json``
reads it, except ``NaN``, ``Infinity`` and ``-Infinity``, which Python accepts
and other parsers (and our own writer, :mod:`outbox.envelope.codec`) do not.
Nesting too deep to read is a ``ValueError`` like any other unreadable text.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text: str | bytes, *, exact_integers: bool = True) -> Any:
    """The JSON document ``text`` as Python values; ValueError if it is not standard JSON.

    ``exact_integers=False`` is the fast way, for readers that only check a
    document and pass its text on (the relay, a replay): orjson reads an
    envelope in a fraction of the stdlib's time, and what it refuses but the
    stdlib reads (lone surrogate escapes, ``1e400``, UTF-16 bytes) goes to the
    stdlib, so both ways accept exactly the same documents. Only an integer
    beyond 64 bits differs: orjson reads it as a float, as RFC 8259 (section 6)
    warns most JSON consumers will, and such a number is then checked at
    double precision.
    """
    if not exact_integers:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # the stdlib decides, and says why it refuses
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("depth limit exceeded: the JSON is nested too deeply") from None
