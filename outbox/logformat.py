"""Log output: JSON lines for machines, plain text on a terminal. Secrets redacted."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from outbox.database import redact
from outbox.logs import FIELDS_ATTR


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, FIELDS_ATTR, None) or {}
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": fields.get("event", "log"),
            "message": redact(record.getMessage()),
        }
        for key, value in fields.items():
            if key != "event":
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(fmt: str = "auto", level: str = "INFO") -> None:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stdout if fmt == "json" else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("outbox")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
