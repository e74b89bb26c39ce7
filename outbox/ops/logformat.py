"""Log output: JSON lines for machines, plain text on a terminal. Secrets redacted.

:func:`configure` puts one handler on the root logger, so that the records of
third-party libraries (apscheduler, kombu, amqp, sqlalchemy, psycopg, Python
warnings) are formatted, and redacted, like the relay's own. Those libraries
log warnings and errors only; ``--log-level`` sets the level of the relay's
own records (the ``outbox`` logger).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
from typing import Any, TextIO

from outbox.logs import FIELDS_ATTR
from outbox.redaction import redact

THIRD_PARTY_LEVEL = logging.WARNING

# Event names for the third-party records worth alerting on, by logger and
# message template (the record's unformatted ``msg``); the others are "log".
THIRD_PARTY_EVENTS: tuple[tuple[str, str, str], ...] = (
    ("apscheduler", "Run time of job", "scheduler_job_missed"),
    ("apscheduler", "Execution of job", "scheduler_job_skipped"),
    ("apscheduler", 'Job "%s" raised', "scheduler_job_failed"),
    ("apscheduler", "Error running job", "scheduler_job_failed"),
    ("py.warnings", "", "python_warning"),
)


def event_name(record: logging.LogRecord) -> str:
    fields: dict[str, Any] = getattr(record, FIELDS_ATTR, None) or {}
    if "event" in fields:
        return str(fields["event"])
    template = str(record.msg)
    for prefix, start, event in THIRD_PARTY_EVENTS:
        if (record.name == prefix or record.name.startswith(prefix + ".")) and (
            template.startswith(start)
        ):
            return event
    return "log"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, FIELDS_ATTR, None) or {}
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event_name(record),
            "message": redact(record.getMessage()),
        }
        for key, value in fields.items():
            if key != "event":
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, default=lambda value: redact(str(value)))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class StandardStreamHandler(logging.StreamHandler[TextIO]):
    """Writes to ``sys.stderr`` (or ``sys.stdout``) as it is when a record is emitted
    (so that a test capturing it, or a process replacing it, gets every record)."""

    def __init__(self, name: str) -> None:
        self.stream_name = name
        super().__init__()

    @property
    def stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self.stream_name)
        return stream

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        """The stream is chosen by name."""


def configure(fmt: str = "auto", level: str = "INFO") -> None:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    # Logs go to stderr in both formats: stdout is a command's output (a table,
    # ``--json``), which a pipe or a script must get alone.
    handler = StandardStreamHandler("stderr")
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    # Handlers of others (pytest's, an embedding application's) stay; ours is replaced.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, StandardStreamHandler)] + [
        handler
    ]
    own = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    root.setLevel(max(own, THIRD_PARTY_LEVEL))
    relay = logging.getLogger("outbox")
    relay.handlers[:] = []
    relay.setLevel(own)
    relay.propagate = True  # to the root's handler: one stream, one format
    logging.captureWarnings(True)  # Python warnings as records, not raw lines on stderr
    # A thread's uncaught exception as a record too, not a raw traceback on stderr.
    threading.excepthook = log_thread_exception


def log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: the exception as an error record (``thread_exception``)."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    error = args.exc_value
    logging.getLogger("outbox").error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, error, args.exc_traceback) if error is not None else None,
        extra={FIELDS_ATTR: {"event": "thread_exception", "thread": name}},
    )
