"""Lossless JSON encoding of resource content.

JSON has no date, UUID or exact-decimal type, so these are written as strings
in a fixed, documented form (see docs/guarantees.md, "Content encoding"):

- ``datetime``: ISO 8601 with microseconds, and the UTC offset when the value
  is aware (``2026-11-26T20:48:42.000123+00:00``); a naive value keeps no offset.
- ``date``: ``YYYY-MM-DD``; ``time``: ISO 8601.
- ``uuid.UUID``: the canonical 36-character lowercase form.
- ``decimal.Decimal``: its exact decimal string (``"12.50"``), never a float.
- ``Enum``: its value, encoded by these same rules.
- tuples and sets/frozensets (sorted) become arrays.

Anything else (bytes, floats that are NaN or infinite, arbitrary objects) is an
error raised at ``publish`` time, naming the path of the offending value.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from outbox.errors import ContentEncodingError

JsonValue = Any


def to_jsonable(value: Any, path: str = "content") -> JsonValue:
    """Return ``value`` with every non-JSON scalar replaced by its documented encoding."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ContentEncodingError(f"{path}: {value!r} has no JSON representation")
        return value
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ContentEncodingError(
                    f"{path}: object keys must be strings, got {type(k).__name__} {k!r}"
                )
            out[k] = to_jsonable(v, f"{path}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v, f"{path}[]") for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ContentEncodingError(f"{path}: {value!r} has no JSON representation")
        return str(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, path)
    raise ContentEncodingError(
        f"{path}: values of type {type(value).__module__}.{type(value).__qualname__} "
        "cannot be encoded as JSON; convert it to str, int, float, bool, list or dict "
        "(datetime, date, UUID and Decimal are encoded automatically)"
    )


def dumps(value: JsonValue) -> str:
    """Compact JSON of an already-jsonable value (:func:`to_jsonable` rejected NaN).

    orjson writes compact JSON without escaping non-ASCII text, as the
    stdlib's ``json.dumps`` did here, several times faster; the one visible
    difference is the exponent of some floats (``1e-7`` for ``1e-07``), the
    same number. What orjson refuses (integers beyond 64 bits, lone
    surrogates) the stdlib writes as before.
    """
    try:
        return orjson.dumps(value).decode("utf-8")
    except (orjson.JSONEncodeError, UnicodeDecodeError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
