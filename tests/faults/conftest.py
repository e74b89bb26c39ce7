"""The fault suite's summary: one line per fault, printed after the run."""

from __future__ import annotations

import pytest

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("fault suite: duplicates per fault")
        for line in SUMMARY:
            terminalreporter.write_line(line)
