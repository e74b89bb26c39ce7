"""Two relays publishing to a 3-node RabbitMQ cluster through a quorum queue, nodes killed.

Run with ``pytest -m cluster tests/cluster`` (excluded from the default run).
Producers commit thousands of events on a few hundred keys while two
``outbox relay`` processes, given all three nodes in ``OUTBOX_BROKER_URL``,
publish them to an exchange bound to one quorum queue. The node the relays
are connected to is killed (``kill -9``) while it leads the queue, and the
survivors are paused for a second right after, so the election is slow and
the relays meet nacks and unconfirmed messages; the node is restarted (it
rejoins), then another node is killed the same way and restarted. The queue is
then drained and checked: every committed event arrived, none of a
rolled-back transaction, per key the first arrivals in commit order, every
duplicate with its original id. Failover times are printed per kill.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import socket
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import amqp
import psycopg
import pytest
from sqlalchemy import Engine

from outbox.store.engine import create_outbox_engine
from tests.cluster import harness as cl
from tests.cluster.conftest import SUMMARY
from tests.conftest import pg_url
from tests.faults import harness
from tests.ops_support import run_cli

pytestmark = pytest.mark.cluster

EVENTS_CAP = int(os.environ.get("OUTBOX_CLUSTER_EVENTS", "40000"))
# Per run: a relay left over from an interrupted run (its pytest killed before
# teardown) reconnects to the next cluster on the same ports, and must not
# publish into this run's queue.
EXCHANGE = f"outbox-cluster-{uuid.uuid4().hex[:8]}"
QUEUE = f"{EXCHANGE}-quorum"
PAUSE = 1.0  # seconds the survivors are stopped right after a kill


class PacedProducers(harness.Producers):
    """The fault suite's producers, paced so that the load lasts through both kills."""

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while self.ledger.total() < self.target:
                harness.produce_one(
                    self.engine, self.keys, self.ledger, rng, rollback=rng.random() < 0.1
                )
                time.sleep(0.01)
        except BaseException as exc:
            self.ledger.errors.append(exc)


@pytest.fixture
def engine(pg_database: str) -> Iterator[Engine]:
    engine = create_outbox_engine(
        pg_url(pg_database), pool_size=8, connect_args={"options": "-c synchronous_commit=off"}
    )
    yield engine
    engine.dispose()


def _declare_topology(node: cl.RabbitNode) -> None:
    """The topology a cluster user should have: a quorum queue bound to the relay's exchange."""
    connection = amqp.Connection(f"127.0.0.1:{node.port}", userid=cl.USER, password=cl.PASSWORD)
    connection.connect()
    channel = connection.channel()
    channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
    channel.queue_declare(
        QUEUE, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
    )
    channel.queue_bind(QUEUE, EXCHANGE, "#")
    connection.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _steer(relays: list[harness.RelayProcess], cluster: cl.Cluster, target: cl.RabbitNode) -> None:
    """Get both relays onto ``target``: close their connections on the node they use.

    A relay whose connection is lost reconnects to the next node of its list,
    so each close moves it one node along. After a stall the relays may be
    in their publish back-off (up to OUTBOX_BACKOFF_MAX, 30 s) and connect
    only when it ends: hence the long deadline.
    """
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        on = {cl.relay_node(r.pid, cluster) for r in relays}
        if on == {target}:
            return
        for node in on:
            if node is not None and node is not target:
                node.ctl("close_all_connections", "outbox cluster suite: moving relays")
        time.sleep(0.5)
    raise AssertionError(f"relays did not move to {target.name}")


@dataclass
class Kill:
    node: str
    at: float  # time.time() of the kill
    reconnected: list[float]  # per relay: seconds from the kill to its broker_failover line
    first_confirm: float | None  # seconds from the kill to the first row marked after them
    restart_seconds: float


def _kill_leader(
    relays: list[harness.RelayProcess], cluster: cl.Cluster, database_url: str
) -> Kill:
    leader = cluster.leader(QUEUE)
    _steer(relays, cluster, leader)
    assert harness.wait_publishing(database_url, more_than=200), "relays not publishing"
    survivors = [n for n in cluster.nodes if n is not leader]
    at = time.time()
    leader.kill()
    for node in survivors:
        node.signal(signal.SIGSTOP)
    try:
        time.sleep(PAUSE)
    finally:
        for node in survivors:
            node.signal(signal.SIGCONT)
    # Until rows flow again: what the survivors say of the queue meanwhile.
    start = harness.delivered_count(database_url)
    deadline = time.monotonic() + 60
    while harness.delivered_count(database_url) < start + 50 and time.monotonic() < deadline:
        status = survivors[1].ctl(
            "list_queues", "--no-table-headers", "name", "leader", "online", check=False
        )
        cluster.events.append(f"{time.time() - at:6.1f} s after kill of {leader.name}: {status!r}")
        time.sleep(2)
    restart = cluster.restart(leader)
    reconnected = []
    for relay in relays:
        moments = [
            dt.datetime.fromisoformat(line["time"]).timestamp()
            for line in cl.json_lines(relay.log_path)
            if line.get("event") == "broker_failover"
        ]
        after = [m - at for m in moments if m >= at]
        assert after, f"{relay.name} logged no broker_failover after the kill of {leader.name}"
        reconnected.append(min(after))
    with psycopg.connect(harness.libpq(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(delivered_at)) FROM outbox_event"
            " WHERE delivered_at >= to_timestamp(%s)",
            (at + min(reconnected),),
        ).fetchone()
    first = None if row is None or row[0] is None else float(row[0]) - at
    return Kill(leader.name, at, reconnected, first, restart)


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ("outbox_broker_failovers_total", 'outbox_publish_failures_total{reason="nacked"}')
    values: dict[str, float] = {}
    for line in body.splitlines():
        for name in wanted:
            if line.startswith(name + " "):
                values[name] = float(line.rsplit(" ", 1)[1])
        if line.startswith("outbox_broker_node_connected{") and line.endswith(" 1.0"):
            values["connected:" + line.split('"')[1]] = 1.0
    return values


def test_check_passes_the_quorum_queue_and_warns_about_a_classic_one(
    cluster: cl.Cluster, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``outbox check --queue`` on the cluster, given the node list as the relay is."""
    connection = amqp.Connection(
        f"127.0.0.1:{cluster.nodes[1].port}", userid=cl.USER, password=cl.PASSWORD
    )
    connection.connect()
    quorum, classic = f"{EXCHANGE}-check-quorum", f"{EXCHANGE}-check-classic"
    channel = connection.channel()
    channel.queue_declare(
        quorum,
        durable=True,
        auto_delete=False,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": 5},
    )
    channel.queue_declare(classic, durable=True, auto_delete=False)
    try:
        code = run_cli(
            [
                "check",
                "--database-url",
                pg_url(pg_database),
                "--broker-url",
                cluster.url_list,
                "--exchange",
                EXCHANGE,
                "--queue",
                quorum,
                "--queue",
                classic,
            ]
        )
        out = capsys.readouterr().out
    finally:
        channel.queue_delete(quorum)
        channel.queue_delete(classic)
        connection.close()
    assert code == 0, out
    assert f"PASS  queue        queue '{quorum}' is a quorum queue" in out
    assert f"WARN  queue        queue '{classic}' is a classic queue" in out
    assert f"{cl.USER}:{cl.PASSWORD}@" not in out  # the node list, redacted


def test_two_node_kills_under_load_lose_nothing_and_keep_per_key_order(
    cluster: cl.Cluster, pg_database: str, engine: Engine
) -> None:
    database_url = pg_url(pg_database)
    # Kept after the run (pytest's tmp_path is rotated by other runs): the relays' logs.
    log_dir = Path(tempfile.mkdtemp(prefix="outbox-cluster-logs-"))
    SUMMARY.append(f"relay logs in {log_dir}")
    _declare_topology(cluster.nodes[0])  # declared on c1: c1 leads the queue
    keys = harness.keys_for_run(300)
    harness.create_resources(engine, keys)
    relays = [
        harness.RelayProcess(
            f"relay{i}",
            database_url=database_url,
            amqp_url=cluster.url_list,
            exchange=EXCHANGE,
            log_dir=log_dir,
        )
        for i in range(2)
    ]
    ports = [_free_port() for _ in relays]
    for relay, port in zip(relays, ports, strict=True):
        relay.env["OUTBOX_HTTP_PORT"] = str(port)
        relay.env["OUTBOX_HTTP_HOST"] = "127.0.0.1"
    producers = PacedProducers(engine, keys, target=EVENTS_CAP, seed=14)
    kills: list[Kill] = []
    metrics: list[dict[str, float]] = []
    try:
        producers.start()
        harness.wait_until(lambda: producers.ledger.total() >= 1000, 60, "a backlog")
        for relay in relays:
            relay.start()
        kills.append(_kill_leader(relays, cluster, database_url))
        if producers.running():
            kills.append(_kill_leader(relays, cluster, database_url))
        producers.stop()
        producers.join()
        harness.wait_until(
            lambda: harness.pending_count(database_url) == 0, 180, "the relays to drain"
        )
        metrics = [_scrape(port) for port in ports]
    finally:
        producers.stop()
        for relay in relays:
            relay.stop()
        SUMMARY.extend(cluster.events)
    assert len(kills) == 2, "the producers finished before the second kill: raise the cap"
    arrivals = harness.consume_all(cluster.any_running().url, QUEUE, quiet=2.0)
    report = harness.check(producers.ledger, arrivals, fault="quorum leader kill -9", injected=2)
    SUMMARY.append(report.line())
    for kill in kills:
        reconnect = ", ".join(f"{s:.3f}" for s in kill.reconnected)
        first = "none" if kill.first_confirm is None else f"{kill.first_confirm:.3f}"
        SUMMARY.append(
            f"kill -9 {kill.node} (leader, survivors paused {PAUSE:g} s): relays reconnected "
            f"after {reconnect} s; first row confirmed on another node after {first} s; "
            f"node back in {kill.restart_seconds:.1f} s"
        )
    for relay, values in zip(relays, metrics, strict=True):
        SUMMARY.append(f"{relay.name} metrics: {values}")
        assert values.get("outbox_broker_failovers_total", 0) >= 2
    print("\n".join(SUMMARY))
