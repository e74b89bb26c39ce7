"""Soak benchmark: does the outbox table stay bounded under a steady load?

A writer commits events at a steady rate while a real ``outbox relay``
process (subprocess, with its retention purge) drains them to RabbitMQ. Every
``--sample`` seconds the script prints the size of ``outbox_event`` (heap,
indexes, total), the rows per state, dead tuples and autovacuum runs. When the
table and its indexes stop growing once retention starts purging, the design
holds; a size that keeps climbing means bloat.

Not part of the test suite. Needs PostgreSQL and RabbitMQ (the test defaults):

    .venv/bin/python -m benchmarks.soak --minutes 10 --rate 200 --retention 60s

It creates (and afterwards drops) its own database and exchange; the queue it
binds keeps at most 1,000 messages, so the broker stays small too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kombu
import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine

ADMIN_URL = os.environ.get("OUTBOX_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
URL_TEMPLATE = os.environ.get(
    "OUTBOX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/{database}"
)
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
SCHEMA = "https://example.org/schemas/case.json"
KEYS = 1000

SAMPLE_SQL = """
SELECT pg_relation_size('outbox_event'),
       pg_indexes_size('outbox_event'),
       pg_total_relation_size('outbox_event'),
       (SELECT count(*) FROM outbox_event WHERE state = 'pending'),
       (SELECT count(*) FROM outbox_event WHERE state = 'delivered'),
       s.n_dead_tup,
       s.autovacuum_count,
       s.autoanalyze_count
FROM pg_stat_user_tables s WHERE s.relname = 'outbox_event'
"""


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[tuple[str, str]]:
    """A private PostgreSQL cluster with default settings, on a free port; removed afterwards."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    root = Path(tempfile.mkdtemp(prefix="outbox-soak-pg-"))
    shutil.chown(root, "postgres")
    data = root / "data"

    def as_postgres(*command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, timeout=120)

    as_postgres(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}"
    as_postgres(
        str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
        "-w", "start",
    )  # fmt: skip
    try:
        yield (
            f"postgresql://postgres@127.0.0.1:{port}/postgres",
            f"postgresql://postgres@127.0.0.1:{port}/{{database}}",
        )
    finally:
        as_postgres(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Sample:
    elapsed: float
    written: int
    heap: int
    indexes: int
    total: int
    pending: int
    delivered: int
    dead_tuples: int
    autovacuums: int
    autoanalyzes: int


class Writer(threading.Thread):
    """Commits ``rate`` events per second, ``per_transaction`` per transaction, on schedule."""

    def __init__(self, engine: Engine, rate: float, per_transaction: int, content_bytes: int):
        super().__init__(daemon=True)
        self.engine = engine
        self.interval = per_transaction / rate
        self.per_transaction = per_transaction
        self.padding = "x" * content_bytes
        self.written = 0
        self.behind = 0.0  # worst lag behind the schedule, seconds
        self.stop = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        sequence = 0
        while not self.stop.is_set():
            with Session(self.engine) as session, session.begin():
                for _ in range(self.per_transaction):
                    sequence += 1
                    outbox.publish(
                        session,
                        outbox.Envelope(
                            action=outbox.Action.UPDATE,
                            schema=SCHEMA,
                            content={
                                "tenantId": 1,
                                "id": sequence % KEYS,
                                "version": sequence,
                                "notes": self.padding,
                            },
                        ),
                    )
            self.written += self.per_transaction
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                self.behind = max(self.behind, -delay)
                if delay < -1.0:
                    next_at = time.monotonic()  # fell behind (busy machine): no catch-up burst


def sample(connection: psycopg.Connection[tuple[int, ...]], started: float, written: int) -> Sample:
    row = connection.execute(SAMPLE_SQL).fetchone()
    assert row is not None
    return Sample(time.monotonic() - started, written, *row)


def mb(size: int) -> str:
    return f"{size / 1048576:8.2f}"


HEADER = (
    f"{'time':>6} {'written':>9} {'pending':>8} {'kept':>8} {'heap MB':>8} "
    f"{'index MB':>8} {'total MB':>8} {'dead tup':>9} {'autovac':>7}"
)


def line(s: Sample) -> str:
    return (
        f"{s.elapsed / 60:5.1f}m {s.written:9d} {s.pending:8d} {s.delivered:8d} {mb(s.heap)} "
        f"{mb(s.indexes)} {mb(s.total)} {s.dead_tuples:9d} {s.autovacuums:7d}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="outbox soak benchmark (table size over time)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--per-transaction", type=int, default=1, help="events per transaction")
    parser.add_argument(
        "--retention", default="60s", help="relay retention (0: delete on delivery)"
    )
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--content-bytes", type=int, default=200, help="padding per event")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument(
        "--own-cluster",
        action="store_true",
        help="run PostgreSQL in a throwaway cluster with default settings (autovacuum on) "
        "instead of the shared server (needs root, initdb and runuser)",
    )
    args = parser.parse_args(argv)
    if args.own_cluster:
        with throwaway_cluster() as (admin_url, url_template):
            return run(args, admin_url, url_template)
    return run(args, ADMIN_URL, URL_TEMPLATE)


def run(args: argparse.Namespace, admin_url: str, url_template: str) -> int:
    database = f"outbox_soak_{uuid.uuid4().hex[:8]}"
    exchange = f"outbox-soak-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
        autovacuum = admin.execute("SHOW autovacuum").fetchone()
    url = url_template.format(database=database)
    engine = create_outbox_engine(url, pool_size=2)
    migrate.upgrade(engine)
    queue = kombu.Queue(
        f"{exchange}-all",
        exchange=kombu.Exchange(exchange, type="topic", durable=True),
        routing_key="#",
        queue_arguments={"x-max-length": 1000, "x-overflow": "drop-head"},
    )
    with kombu.Connection(AMQP_URL) as connection:
        queue(connection.default_channel).declare()

    log = Path(tempfile.gettempdir()) / f"{database}-relay.log"
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": url,
        "OUTBOX_BROKER_URL": AMQP_URL,
        "OUTBOX_EXCHANGE": exchange,
        "OUTBOX_RETENTION": args.retention,
        "OUTBOX_LOG_FORMAT": "json",
        "OUTBOX_LOG_LEVEL": "INFO",
    }
    print(
        f"soak: {args.minutes:g} min at {args.rate:g} events/s "
        f"({args.per_transaction} per transaction), retention {args.retention}, "
        f"database {database} (autovacuum {autovacuum[0] if autovacuum else '?'}), "
        f"relay log {log}",
        flush=True,
    )
    samples: list[Sample] = []
    with log.open("w") as log_file:
        relay = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "relay"], env=env, stdout=log_file, stderr=log_file
        )
        writer = Writer(engine, args.rate, args.per_transaction, args.content_bytes)
        started = time.monotonic()
        try:
            writer.start()
            print(HEADER, flush=True)
            with psycopg.connect(url, autocommit=True) as connection:
                end = started + args.minutes * 60
                while True:
                    samples.append(sample(connection, started, writer.written))
                    print(line(samples[-1]), flush=True)
                    if time.monotonic() >= end or relay.poll() is not None:
                        break
                    time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
                writer.stop.set()
                writer.join()
                # Let the relay catch up with the last writes.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and sample(connection, started, 0).pending:
                    time.sleep(0.5)
                samples.append(sample(connection, started, writer.written))
                print(line(samples[-1]) + "  (writer stopped, backlog drained)", flush=True)
        finally:
            writer.stop.set()
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(30)
            except subprocess.TimeoutExpired:
                relay.kill()
            engine.dispose()
            if not args.keep_database:
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            with contextlib.suppress(Exception), kombu.Connection(AMQP_URL) as connection:
                queue(connection.default_channel).delete()
                connection.default_channel.exchange_delete(exchange)

    summarize(samples, writer, relay.returncode)
    return 0


def summarize(samples: list[Sample], writer: Writer, relay_exit: int | None) -> None:
    if len(samples) < 3:
        return
    steady = samples[len(samples) // 2 : -1] or samples[-2:-1]
    peak = max(samples, key=lambda s: s.total)
    achieved = writer.written / (samples[-2].elapsed or 1)
    print()
    print(
        f"written {writer.written} events ({achieved:.0f}/s achieved; writer worst lag "
        f"{writer.behind:.2f}s); relay exit code {relay_exit}"
    )
    print(f"peak total size {mb(peak.total).strip()} MB at {peak.elapsed / 60:.1f} min")
    low, high = min(s.total for s in steady), max(s.total for s in steady)
    print(
        f"second half: total {mb(low).strip()}..{mb(high).strip()} MB, "
        f"indexes {mb(min(s.indexes for s in steady)).strip()}.."
        f"{mb(max(s.indexes for s in steady)).strip()} MB, "
        f"rows kept {min(s.delivered for s in steady)}..{max(s.delivered for s in steady)}"
    )


if __name__ == "__main__":
    sys.exit(main())
