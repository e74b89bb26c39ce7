"""Parsing operator-facing values: durations (``7d``, ``90m``), TCP ports, points in time."""

from __future__ import annotations

import datetime as dt
import math
import re

_DURATION = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def duration_seconds(text: str) -> float:
    """``30``, ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds (0 allowed)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"expected a duration such as 30s, 15m, 12h or 7d, got {text!r}")
    seconds = float(match.group("number")) * _UNIT_SECONDS[match.group("unit") or "s"]
    if not math.isfinite(seconds):
        raise ValueError(f"duration out of range: {text!r}")
    return seconds


def port_number(text: str) -> int:
    """A TCP port, or 0 for "off"."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a port number (0 = off), got {text!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number between 0 and 65535, got {text!r}")
    return value


def point_in_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO 8601 time (UTC if no offset), or a duration meaning that long ago."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        return now - dt.timedelta(seconds=duration_seconds(text))
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time (2026-11-26T10:00:00Z) or an age (2h, 7d), got {text!r}"
        ) from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment
