"""Drain rate with 1, 2 and 4 relays, against the single broker and a 3-node cluster.

    .venv/bin/python -m benchmarks.scaling                  # 1, 2, 4 relays; 40,000 events
    .venv/bin/python -m benchmarks.scaling --relays 1,2 --events 20000

Each measurement: a fresh database and exchange, N real ``outbox relay``
processes with default settings, started on an empty table and left until
every one of them holds partitions (the fair shares are settled before the
clock starts). Then a backlog of 1 KiB events on 1,000 keys becomes pending
in one commit, with a NOTIFY, and the clock runs until no row is pending:
every event confirmed and marked. The backlog is written beforehand as
delivered rows and flipped to pending by that one UPDATE, so the inserting,
vacuuming and checkpointing stay outside the clock.

Targets: the shared broker (127.0.0.1:5672, a durable classic queue: what a
single node offers) and a throwaway 3-node RabbitMQ cluster started by the
cluster suite's harness (nodes on 5681-5683, a quorum queue declared on the
first node, so the first node leads it). Relay i is given the three nodes
starting with node i mod 3, so the relays spread over the nodes as they would
with a load balancer in front; every message still goes to the quorum queue's
leader, which replicates it to the two others before confirming.

Everything shares the machine's cores: read the ratios against one relay in
the same run, not the absolute rates (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.figures import amqp_channel, fresh_database, libpq, seed_pending

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass(frozen=True)
class Target:
    name: str
    urls: list[str]  # one per node
    queue_arguments: dict[str, Any]

    def relay_urls(self, index: int) -> str:
        """The node list for relay ``index``: rotated, so relays start on different nodes."""
        start = index % len(self.urls)
        return ";".join(self.urls[start:] + self.urls[:start])


@dataclass(frozen=True)
class Result:
    target: str
    relays: int
    rate: float
    seconds: float


@contextlib.contextmanager
def _exchange_and_queue(target: Target) -> Iterator[tuple[str, str]]:
    name = f"outbox-scaling-{uuid.uuid4().hex[:8]}"
    with amqp_channel(target.urls[0]) as channel:
        channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
        channel.queue_declare(
            name, durable=True, auto_delete=False, arguments=target.queue_arguments
        )
        channel.queue_bind(name, name, "#")
    try:
        yield name, name
    finally:
        with amqp_channel(target.urls[0]) as channel:
            channel.queue_delete(name)
            channel.exchange_delete(name)


def _relay(database_url: str, broker_url: str, exchange: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_BROKER_URL": broker_url,
        "OUTBOX_EXCHANGE": exchange,
        "OUTBOX_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "relay"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _owners(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(DISTINCT owner) FROM outbox_partition"
        " WHERE owner IS NOT NULL AND lease_expires_at > now()"
    ).fetchone()
    return 0 if row is None else int(row[0])


def _pending(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM outbox_event WHERE state = 'pending')"
    ).fetchone()
    return bool(row and row[0])


def _queue_depth(target: Target, queue: str) -> int:
    with amqp_channel(target.urls[0]) as channel:
        return int(channel.queue_declare(queue, passive=True).message_count)


def measure(admin_url: str, target: Target, relays: int, events: int) -> Result:
    with fresh_database(admin_url) as url, _exchange_and_queue(target) as (exchange, queue):
        seed_pending(url, events, state="delivered")
        processes = [_relay(url, target.relay_urls(i), exchange) for i in range(relays)]
        try:
            with psycopg.connect(libpq(url), autocommit=True) as conn:
                deadline = time.monotonic() + 60
                while _owners(conn) < relays:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                        raise RuntimeError(f"{relays} relays did not all take partitions")
                    time.sleep(0.1)
                with conn.transaction():
                    conn.execute("UPDATE outbox_event SET state = 'pending', delivered_at = NULL")
                    conn.execute("NOTIFY outbox_event")
                start = time.perf_counter()
                while _pending(conn):
                    if time.perf_counter() - start > 600:
                        raise RuntimeError("the relays did not drain the backlog")
                    time.sleep(0.01)
                elapsed = time.perf_counter() - start
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
        arrived = _queue_depth(target, queue)
        if arrived < events:
            raise RuntimeError(f"{arrived} of {events} events reached {target.name}")
    return Result(target.name, relays, events / elapsed, elapsed)


@contextlib.contextmanager
def _cluster() -> Iterator[Target]:
    # The cluster suite's harness: nodes of their own, torn down by their PIDs.
    from tests.cluster.harness import cluster_of_three

    base = Path(tempfile.mkdtemp(prefix="outbox-scaling-"))
    with cluster_of_three(base) as cluster:
        print(f"3-node cluster formed in {cluster.formed_in:.1f} s", flush=True)
        yield Target(
            "3-node cluster, quorum queue",
            [node.url for node in cluster.nodes],
            {"x-queue-type": "quorum"},
        )


def render(results: Sequence[Result]) -> str:
    lines = [
        "target                       | relays | events/s | vs 1 relay, same target | seconds",
        "-----------------------------+--------+----------+-------------------------+--------",
    ]
    for result in results:
        ones = [r.rate for r in results if r.target == result.target and r.relays == 1]
        ratio = f"{result.rate / statistics.median(ones):.2f}x" if ones else ""
        lines.append(
            f"{result.target:<28} | {result.relays:>6} | {result.rate:>8,.0f} |"
            f" {ratio:>23} | {result.seconds:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--relays", default="1,2,4", help="comma-separated relay counts")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--no-cluster", action="store_true", help="the single broker only")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.relays.split(",")]
    single = Target("single broker, classic queue", [args.amqp_url], {})
    results: list[Result] = []

    def run(target: Target) -> None:
        for relays in counts:
            result = measure(args.pg_admin_url, target, relays, args.events)
            print(f"{target.name}: {relays} relay(s) {result.rate:,.0f} events/s", flush=True)
            results.append(result)

    run(single)
    if not args.no_cluster:
        with _cluster() as cluster:
            run(cluster)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
