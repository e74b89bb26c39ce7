"""The failover suite's fixtures: a throwaway cluster per test, and the printed summary."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.failover import pgcluster

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("PostgreSQL failover suite")
        for line in SUMMARY:
            terminalreporter.write_line(line)


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def cluster() -> Iterator[pgcluster.Cluster]:
    """An empty directory for a primary (5441) and a standby (5442); both stopped after."""
    reason = pgcluster.available()
    taken = [p for p in (pgcluster.PRIMARY_PORT, pgcluster.STANDBY_PORT) if _port_taken(p)]
    if taken:
        reason = f"ports {taken} are in use (a cluster left over, or another service)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with pgcluster.throwaway_cluster() as made:
        yield made
