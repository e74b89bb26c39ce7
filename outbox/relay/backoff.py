"""Retry delays that grow, and failure logs that speak once per change of state.

A relay that cannot reach its database or broker, or whose messages keep
failing, retries after 0.2 s, 0.4 s, 0.8 s... up to 30 s (by default), and the
delay starts again from the bottom only once something succeeded. Its log says
so once when the trouble starts and once when it ends, with the number of
attempts in between, instead of one line per attempt.
"""

from __future__ import annotations

import logging
from typing import Any

from outbox.logs import emit


class Backoff:
    """Doubling delays between ``initial`` and ``maximum``; :meth:`reset` on success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._delay = 0.0

    def next_delay(self) -> float:
        self._delay = min(self.maximum, max(self.initial, self._delay * 2))
        return self._delay

    def reset(self) -> None:
        self._delay = 0.0

    @property
    def current(self) -> float:
        return self._delay


class FailureLog:
    """Logs the first failure of a kind and the recovery; counts the attempts between."""

    def __init__(self, logger: logging.Logger, failed_event: str, recovered_event: str) -> None:
        self.logger = logger
        self.failed_event = failed_event
        self.recovered_event = recovered_event
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, message: str, *args: Any, **fields: Any) -> None:
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        emit(self.logger, self.failed_event, message, *args, level=level, **fields)

    def recovered(self, message: str, *args: Any, **fields: Any) -> None:
        if not self.failures:
            return
        attempts, self.failures = self.failures, 0
        emit(
            self.logger,
            self.recovered_event,
            message + " after %d failed attempts",
            *args,
            attempts,
            failed_attempts=attempts,
            **fields,
        )
