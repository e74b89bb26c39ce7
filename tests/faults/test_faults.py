"""Fault injection: real relays, real RabbitMQ, concurrent producers, things breaking.

Run with ``pytest -m faults`` (excluded from the default run). Each test
streams several thousand events from concurrent producers (a tenth of the
transactions roll back) through ``outbox relay`` processes into a queue while
one kind of fault is injected at random moments, then consumes the queue and
asserts: every committed event arrived at least once, no rolled-back event
arrived, per key the first arrivals are in commit order, and every duplicate
carries the original message id. The duplicates each fault caused are printed
in the terminal summary.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import psycopg
import pytest
from sqlalchemy import Engine

from outbox.store.engine import create_outbox_engine
from outbox.store.session import session_limits
from tests.conftest import pg_url
from tests.faults import harness
from tests.faults.conftest import SUMMARY

pytestmark = pytest.mark.faults

# Per test; five tests make tens of thousands. Smaller runs: OUTBOX_FAULT_EVENTS=1000.
EVENTS = int(os.environ.get("OUTBOX_FAULT_EVENTS", "4000"))


@pytest.fixture
def engine(pg_database: str) -> Iterator[Engine]:
    # The producers' commits skip the WAL flush wait: faster runs, and the
    # suite never crashes PostgreSQL itself. The relays use the defaults.
    engine = create_outbox_engine(
        pg_url(pg_database),
        pool_size=8,
        connect_args={"options": "-c synchronous_commit=off"},
    )
    yield engine
    engine.dispose()


Chaos = Callable[[list[harness.RelayProcess], harness.Producers], int]


def run(
    *,
    fault: str,
    chaos: Chaos,
    replicas: int,
    pg_database: str,
    engine: Engine,
    amqp_url: str,
    exchange: str,
    queue: kombu.Queue,
    log_dir: Path,
    events: int = EVENTS,
) -> harness.Report:
    database_url = pg_url(pg_database)
    keys = harness.keys_for_run()
    harness.create_resources(engine, keys)
    relays = [
        harness.RelayProcess(
            f"relay{i}",
            database_url=database_url,
            amqp_url=amqp_url,
            exchange=exchange,
            log_dir=log_dir,
        )
        for i in range(replicas)
    ]
    seed = zlib.crc32(fault.encode()) % 1000
    producers = harness.Producers(engine, keys, target=events, seed=seed)
    try:
        producers.start()
        # A backlog first, so that faults also hit full batches in flight.
        harness.wait_until(
            lambda: producers.ledger.total() >= events // 3 or not producers.running(),
            120,
            "a backlog",
        )
        for relay in relays:
            relay.start()
        injected = chaos(relays, producers)
        producers.join()
        for relay in relays:
            if not relay.alive():
                relay.start()
        harness.wait_until(
            lambda: harness.pending_count(database_url) == 0, 120, "the relays to drain"
        )
    finally:
        for relay in relays:
            relay.stop()
    arrivals = harness.consume_all(amqp_url, queue.name)
    report = harness.check(producers.ledger, arrivals, fault=fault, injected=injected)
    SUMMARY.append(report.line())
    return report


def while_producing(
    producers: harness.Producers,
    times: int,
    action: Callable[[random.Random], bool],
    *,
    database_url: str,
) -> int:
    """Run ``action`` up to ``times`` times at random moments while the relays have work."""
    rng = random.Random(times)
    done = 0
    give_up = time.monotonic() + 180
    while done < times and time.monotonic() < give_up:
        if not producers.running() and harness.pending_count(database_url) < 300:
            break  # too little left to hit a batch in flight
        # Mid-stream: the relays are delivering right now, then a random instant.
        if not harness.wait_publishing(database_url, more_than=rng.randint(50, 300)):
            continue
        if action(rng):
            done += 1
    return done


@pytest.fixture
def scenario(
    pg_database: str,
    engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    tmp_path: Path,
) -> Callable[..., harness.Report]:
    def go(fault: str, chaos: Chaos, *, replicas: int) -> harness.Report:
        return run(
            fault=fault,
            chaos=chaos,
            replicas=replicas,
            pg_database=pg_database,
            engine=engine,
            amqp_url=amqp_url,
            exchange=exchange_name,
            queue=bound_queue,
            log_dir=tmp_path,
        )

    return go


def test_sigkill_single_relay(scenario: Callable[..., harness.Report], pg_database: str) -> None:
    def chaos(relays: list[harness.RelayProcess], producers: harness.Producers) -> int:
        url = pg_url(pg_database)

        def kill_and_restart(_rng: random.Random) -> bool:
            relays[0].kill()
            relays[0].start()  # waits for the dead relay's leases to expire
            return True

        return while_producing(producers, 4, kill_and_restart, database_url=url)

    report = scenario("SIGKILL, one relay (restarted)", chaos, replicas=1)
    assert report.faults_injected >= 2


def test_sigkill_with_second_replica(
    scenario: Callable[..., harness.Report], pg_database: str
) -> None:
    def chaos(relays: list[harness.RelayProcess], producers: harness.Producers) -> int:
        url = pg_url(pg_database)

        def kill_one(rng: random.Random) -> bool:
            victim = rng.choice(relays)
            victim.kill()
            time.sleep(0.5)  # the survivor takes over once the leases expire
            victim.start()
            return True

        return while_producing(producers, 4, kill_one, database_url=url)

    report = scenario("SIGKILL, two replicas", chaos, replicas=2)
    assert report.faults_injected >= 2


def test_broker_closes_relay_connections(
    scenario: Callable[..., harness.Report], pg_database: str
) -> None:
    missing = [tool for tool in ("rabbitmqctl", "ss") if shutil.which(tool) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"needs {' and '.join(missing)} on this host")

    def chaos(relays: list[harness.RelayProcess], producers: harness.Producers) -> int:
        url = pg_url(pg_database)

        def close(_rng: random.Random) -> bool:
            return harness.close_broker_connections(relays[0].pid) > 0

        return while_producing(producers, 2, close, database_url=url)

    report = scenario("broker closes the relay's connection", chaos, replicas=1)
    assert report.faults_injected >= 1


def test_broker_restarts(
    scenario: Callable[..., harness.Report], pg_database: str, tmp_path: Path
) -> None:
    if shutil.which("rabbitmqctl") is None and not os.environ.get("CI"):
        pytest.skip("needs rabbitmqctl on this host")

    def chaos(relays: list[harness.RelayProcess], producers: harness.Producers) -> int:
        url = pg_url(pg_database)

        def restart(rng: random.Random) -> bool:
            harness.restart_broker(down_seconds=rng.uniform(0.5, 3.0))
            return True

        return while_producing(producers, 2, restart, database_url=url)

    report = scenario("RabbitMQ restarted", chaos, replicas=2)
    assert report.faults_injected >= 1
    # The restarts reached the relays: they lost the broker and came back.
    logs = "".join(path.read_text() for path in tmp_path.glob("relay*.log"))
    assert '"relay_publish_failed"' in logs or '"relay_broker_unavailable"' in logs


def test_pg_terminate_relay_backends(
    scenario: Callable[..., harness.Report], pg_database: str
) -> None:
    def chaos(relays: list[harness.RelayProcess], producers: harness.Producers) -> int:
        url = pg_url(pg_database)

        def terminate(_rng: random.Random) -> bool:
            return harness.terminate_relay_backends(pg_url(pg_database), pg_database) > 0

        return while_producing(producers, 5, terminate, database_url=url)

    report = scenario("pg_terminate_backend on relay backends", chaos, replicas=2)
    assert report.faults_injected >= 2


def test_long_open_producer_transaction(
    scenario: Callable[..., harness.Report], engine: Engine
) -> None:
    def chaos(relays: list[harness.RelayProcess], producers: harness.Producers) -> int:
        held = 0
        rng = random.Random(7)
        while held < 2 and producers.running():
            # Takes its positions now, commits 3 s later, while the others commit.
            thread = threading.Thread(
                target=harness.produce_one,
                args=(engine, producers.keys, producers.ledger, rng),
                kwargs={"hold": 3.0},
            )
            thread.start()
            thread.join()
            held += 1
        return held

    report = scenario("producer transaction held open 3 s", chaos, replicas=1)
    assert report.faults_injected >= 1


def test_relay_frozen_in_a_transaction(
    pg_database: str,
    engine: Engine,
    amqp_url: str,
    exchange_name: str,
    bound_queue: kombu.Queue,
    tmp_path: Path,
) -> None:
    """SIGSTOP a relay idle inside a transaction holding row locks: the other one takes over.

    The server ends the frozen session (idle_in_transaction_session_timeout),
    so its locks are gone before its leases expire, and the survivor neither
    waits on them for its own partitions nor for the ones it takes over.
    """
    if shutil.which("ss") is None and not os.environ.get("CI"):
        pytest.skip("needs ss on this host")
    url = pg_url(pg_database)
    ttl = 2.0  # OUTBOX_LEASE_TTL of harness.RelayProcess
    idle = session_limits(ttl)["idle_in_transaction_session_timeout"] / 1000
    # Leases expire, the survivor's next rebalance claims them; the server has
    # ended the frozen session by then; a second for a loaded test host.
    bound = ttl + ttl / 5 + idle + 1.0
    frozen_for = 3 * ttl
    keys = harness.keys_for_run()
    harness.create_resources(engine, keys)
    victim, survivor = (
        harness.RelayProcess(
            name, database_url=url, amqp_url=amqp_url, exchange=exchange_name, log_dir=tmp_path
        )
        for name in ("relay0", "relay1")
    )
    producers = harness.Producers(engine, keys, target=10**9, seed=17)
    freeze: harness.Freeze | None = None
    owners_over_time: list[tuple[float, dict[str, int]]] = []
    try:
        producers.start()
        victim.start()
        survivor.start()
        harness.wait_until(lambda: len(_live_owners(url)) == 2, 30, "both relays to own partitions")
        assert harness.wait_publishing(url, more_than=300)
        freeze = harness.freeze_in_transaction(victim, url, timeout=20)
        assert freeze is not None, "never caught the relay idle in a transaction"
        frozen_at = time.monotonic()
        victim_partitions = _partitions_of(url, victim.pid)
        assert victim_partitions, "the frozen relay owned no partition"
        while time.monotonic() < frozen_at + frozen_for:
            owners_over_time.append((time.monotonic() - frozen_at, _live_owners(url)))
            time.sleep(0.1)
        thaw_at = _db_now(url)
        os.kill(victim.pid, signal.SIGCONT)
        producers.stop()
        producers.join()
        harness.wait_until(lambda: harness.pending_count(url) == 0, 60, "the relays to drain")
    finally:
        if freeze is not None and victim.alive():
            os.kill(victim.pid, signal.SIGCONT)
        producers.stop()
        victim.stop()
        survivor.stop()

    survivor_id = f":{survivor.pid}:"
    took_all = next(
        (at for at, owners in owners_over_time if sum(owners.values()) == 16 and len(owners) == 1),
        None,
    )
    assert took_all is not None and all(survivor_id in o for o in owners_over_time[-1][1])
    deliveries = _deliveries(url, freeze.at, thaw_at)
    takeover = next(
        ((at - freeze.at).total_seconds() for at, p in deliveries if p in victim_partitions), None
    )
    moments = [freeze.at, *(at for at, _ in deliveries), thaw_at]
    gap = max((b - a).total_seconds() for a, b in itertools.pairwise(moments))
    shown = "never" if takeover is None else f"{takeover:.2f}s"
    line = (
        f"frozen relay: {freeze.attempts} SIGSTOPs to land idle in a transaction; survivor"
        f" leased all partitions after {took_all:.2f}s, delivered the frozen relay's after"
        f" {shown}; longest gap in deliveries {gap:.2f}s (bound {bound:.2f}s)"
    )
    print(f"{line}; frozen after {freeze.last_statement!r}")
    SUMMARY.append(line)
    assert takeover is not None and takeover <= bound, line
    assert gap <= bound, line

    arrivals = harness.consume_all(amqp_url, bound_queue.name)
    report = harness.check(producers.ledger, arrivals, fault="SIGSTOP in a transaction", injected=1)
    SUMMARY.append(report.line())


def _db_now(url: str) -> Any:
    with psycopg.connect(harness.libpq(url), autocommit=True) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def _live_owners(url: str) -> dict[str, int]:
    with psycopg.connect(harness.libpq(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT owner, count(*) FROM outbox_partition"
            " WHERE owner IS NOT NULL AND lease_expires_at > now() GROUP BY owner"
        ).fetchall()
    return {str(owner): int(count) for owner, count in rows}


def _partitions_of(url: str, pid: int) -> set[int]:
    with psycopg.connect(harness.libpq(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT partition FROM outbox_partition WHERE owner LIKE %s", (f"%:{pid}:%",)
        ).fetchall()
    return {int(p) for (p,) in rows}


def _deliveries(url: str, since: Any, until: Any) -> list[tuple[Any, int]]:
    """(delivered_at, partition) of the rows delivered between ``since`` and ``until``."""
    with psycopg.connect(harness.libpq(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT delivered_at, partition FROM outbox_event WHERE state = 'delivered'"
            " AND delivered_at > %s AND delivered_at <= %s ORDER BY delivered_at",
            (since, until),
        ).fetchall()
    return [(at, int(p)) for at, p in rows]
