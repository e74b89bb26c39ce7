"""Structured log records: every record carries a machine-readable event name.

``emit(log, "retention_purged", "purged %d rows", n, count=n)``
logs the human message and attaches ``event`` plus the keyword fields, which
the JSON formatter (:mod:`outbox.ops.logformat`) writes as top-level keys.
"""

from __future__ import annotations

import logging
from typing import Any

FIELDS_ATTR = "outbox_fields"


def emit(
    logger: logging.Logger,
    event: str,
    message: str,
    *args: Any,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    if logger.isEnabledFor(level):
        logger.log(
            level,
            message,
            *args,
            exc_info=exc_info,
            extra={FIELDS_ATTR: {"event": event, **fields}},
        )
