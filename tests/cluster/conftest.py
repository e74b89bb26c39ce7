"""The cluster suite's 3-node RabbitMQ cluster and its summary lines.

One cluster per run of this package, torn down before the next suite starts
(``-m "cluster or hosts or failover"`` runs them one after the other).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import RABBIT_BIN, Cluster, cluster_of_three

SUMMARY: list[str] = []


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        message = f"RabbitMQ is not installed in {RABBIT_BIN}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="outbox-cluster-"))
    try:
        with cluster_of_three(base) as formed:
            SUMMARY.append(f"cluster of 3 formed in {formed.formed_in:.1f} s")
            yield formed
    finally:
        shutil.rmtree(base, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("cluster suite")
        for line in SUMMARY:
            terminalreporter.write_line(line)
