"""PostgreSQL failover and crashes under load, on throwaway clusters (``pytest -m failover``).

A real ``outbox relay`` process and concurrent producers (tests.faults.harness)
are given one multi-host URL naming a primary (5441) and its streaming
standby (5442) with ``target_session_attrs=read-write``. Mid-stream the
primary is crashed (``pg_ctl -m immediate``) and the standby promoted; relay
and producers must find the new primary by themselves. Then the queue is
consumed and checked against what the producers committed:

- with synchronous replication, every acknowledged commit survives the
  failover and arrives: exactly, nothing may be lost;
- with asynchronous replication, what the standby had not received is lost
  with the primary. The test counts those events, and asserts the guarantee
  for the history that survived: every event the new primary has arrived.

Either way first arrivals per key keep commit order and duplicates carry the
original ids (``harness.check``). A separate test crashes and restarts one
server: the relay's marks are asynchronous commits, so a crash forgets the
latest ones, which only makes duplicates.

Events per test: about OUTBOX_FAILOVER_EVENTS (default 3000), half of them
committed before the crash, half after.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kombu
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import outbox
from outbox.errors import StoreUnavailable
from tests.failover import pgcluster
from tests.failover.conftest import SUMMARY
from tests.faults import harness

pytestmark = pytest.mark.failover

EVENTS = int(os.environ.get("OUTBOX_FAILOVER_EVENTS", "3000"))
# In the URLs given to the relay and to `outbox migrate`: it must never be printed.
# (Trust authentication: the servers never ask for it.)
PASSWORD = "failover-pw-7Qx"

_BUMP = harness._BUMP
# What a producer's transaction raises when its server goes away: the driver's
# error, or outbox.publish's own when the schema registry could not read.
OUTAGE = (DBAPIError, StoreUnavailable)


# -- producers that live through a failover ------------------------------------


@dataclass
class Doubt:
    """Events whose COMMIT got no answer: committed or not, only the survivor can tell."""

    events: dict[str, tuple[str, int]] = field(default_factory=dict)


class FailoverProducers(harness.Producers):
    """harness.Producers that retry after a failed transaction instead of stopping.

    A transaction that failed before its COMMIT was sent committed nothing: its
    events join the ledger's rolled-back ones, which must never arrive. One whose
    COMMIT failed is in doubt (``doubt``); the test asks the surviving server.
    """

    def __init__(self, engine: Engine, keys: list[str], *, target: int, seed: int) -> None:
        super().__init__(engine, keys, target=target, seed=seed)
        self.doubt = Doubt()
        self.failures = 0

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while self.ledger.total() < self.target:
                try:
                    self._one(rng, rollback=rng.random() < 0.1)
                except OUTAGE:
                    self.failures += 1
                    time.sleep(0.05)  # the server is down or not yet promoted
        except BaseException as exc:
            self.ledger.errors.append(exc)

    def _one(self, rng: random.Random, *, rollback: bool) -> None:
        chosen = sorted(rng.sample(self.keys, rng.randint(1, 3)))
        events: dict[str, tuple[str, int]] = {}
        with Session(self.engine) as session:
            try:
                session.begin()
                for key in chosen:
                    version = session.execute(_BUMP, {"k": key}).scalar_one()
                    envelope = harness._envelope(key, version)
                    events[str(outbox.publish(session, envelope, key=key))] = (key, version)
                outbox.flush_events(session)  # any failure from here on precedes COMMIT
            except OUTAGE:
                with self.ledger.lock:
                    self.ledger.rolled_back.update(events)
                raise
            if rollback:
                session.rollback()
                with self.ledger.lock:
                    self.ledger.rolled_back.update(events)
                return
            try:
                session.commit()
            except OUTAGE:
                with self.ledger.lock:
                    self.doubt.events.update(events)
                raise
        with self.ledger.lock:
            self.ledger.committed.update(events)


# -- accounting ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What survived the crash and what did not; :func:`verify` checks the survivors."""

    kept: harness.Ledger  # the history that survived: acknowledged or in doubt, on the survivor
    gone: set[str]  # events of the history that did not survive (the old primary's only)
    arrivals: list[harness.Arrival]
    lost: int  # acknowledged commits the surviving server does not have
    lost_but_delivered: int  # of those, published before the crash
    doubtful: int  # commits without an answer
    doubtful_kept: int  # of those, on the surviving server


def account(
    producers: FailoverProducers, arrivals: list[harness.Arrival], survivor: pgcluster.Node
) -> Outcome:
    """Split what the producers did into the history that survived and the one that did not."""
    ledger = producers.ledger
    surviving = {str(row[0]) for row in survivor.query("SELECT event_id FROM outbox_event")}
    assert not ledger.rolled_back & surviving, "a transaction that failed before COMMIT survived"
    doubt = producers.doubt.events
    lost = set(ledger.committed) - surviving
    kept = harness.Ledger(
        committed={
            **{i: kv for i, kv in ledger.committed.items() if i in surviving},
            **{i: kv for i, kv in doubt.items() if i in surviving},
        },
        rolled_back=set(ledger.rolled_back),
    )
    arrived = {a.message_id for a in arrivals}
    return Outcome(
        kept=kept,
        gone=lost | (set(doubt) - surviving),
        arrivals=arrivals,
        lost=len(lost),
        lost_but_delivered=len(lost & arrived),
        doubtful=len(doubt),
        doubtful_kept=len(set(doubt) & surviving),
    )


def verify(
    outcome: Outcome, survivor: pgcluster.Node, *, fault: str, old: pgcluster.Node | None = None
) -> harness.Report:
    """harness.check on the history that survived.

    A lost event's key and version are committed again on the survivor under
    a new id: that history is gone, so its arrivals are left out of the checks.
    """
    arrived = {a.message_id for a in outcome.arrivals}
    missing = sorted(set(outcome.kept.committed) - arrived)
    if missing:  # what the survivor says of them, before check() fails
        rows = survivor.query(
            "SELECT event_id, position, state, attempts, delivered_at"
            " FROM outbox_event WHERE event_id = ANY(%s::uuid[]) ORDER BY position",
            (missing,),
        )
        print(f"{len(missing)} surviving events never arrived, e.g.:", *rows[:5], sep="\n  ")
        if old is not None and outcome.gone:
            # The old primary's diverged history: the positions its lost events had.
            old.start()
            taken = old.query(
                "SELECT position FROM outbox_event WHERE event_id = ANY(%s::uuid[])",
                (sorted(outcome.gone),),
            )
            reused = sorted({row[0] for row in taken} & {row[1] for row in rows})
            print(f"{len(reused)} of their positions were lost events' on the old primary")
    arrivals = [a for a in outcome.arrivals if a.message_id not in outcome.gone]
    return harness.check(outcome.kept, arrivals, fault=fault, injected=1)


# -- running -------------------------------------------------------------------


def outbox_cli(args: list[str], database_url: str) -> str:
    """``outbox ARGS`` in a subprocess; its output, which must not show the password."""
    result = subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        env={**os.environ, "OUTBOX_DATABASE_URL": database_url, "OUTBOX_LOG_LEVEL": "INFO"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert PASSWORD not in output
    return output


def first_mark_after(node: pgcluster.Node, instant: float) -> float | None:
    """Seconds from ``instant`` (epoch) to the first delivery marked on ``node`` after it."""
    rows = node.query(
        "SELECT extract(epoch FROM min(delivered_at)) FROM outbox_event"
        " WHERE delivered_at >= to_timestamp(%s)",
        (instant,),
    )
    return None if rows[0][0] is None else float(rows[0][0]) - instant


def crash_when_drained(node: pgcluster.Node, timeout: float = 120) -> float:
    """Crash ``node`` as soon as no row is pending; the moment (epoch) of the crash."""
    deadline = time.monotonic() + timeout
    with node.connect() as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM outbox_event WHERE state <> 'delivered'")
            if row.fetchone() == (0,):
                break
            assert time.monotonic() < deadline, "the relay did not drain"
            time.sleep(0.002)
    crashed = time.time()
    node.crash()
    return crashed


@dataclass
class Load:
    """Producers on the multi-host URL, a relay process on it, and the queue they fill."""

    producers: FailoverProducers
    relay: harness.RelayProcess
    engine: Engine


@pytest.fixture
def load_parts(
    amqp_url: str, exchange_name: str, bound_queue: kombu.Queue, tmp_path: Path
) -> Iterator[dict[str, object]]:
    parts: dict[str, object] = {
        "amqp_url": amqp_url,
        "exchange": exchange_name,
        "queue": bound_queue,
        "log_dir": tmp_path,
    }
    yield parts
    load = parts.get("load")
    if isinstance(load, Load):
        load.producers.stop()
        load.relay.stop()
        load.engine.dispose()


def start_load(parts: dict[str, object], database_url: str, *, seed: int) -> Load:
    """Producers committing until stopped, and the relay once they made a backlog."""
    # The application's own engine, straight from SQLAlchemy: the repeated-host
    # URL is SQLAlchemy's form, and the pre-ping drops connections to a dead host.
    engine = create_engine(database_url, pool_size=8, pool_pre_ping=True)
    keys = harness.keys_for_run(200)
    harness.create_resources(engine, keys)
    producers = FailoverProducers(engine, keys, target=sys.maxsize, seed=seed)
    relay = harness.RelayProcess(
        "relay",
        database_url=database_url,
        amqp_url=str(parts["amqp_url"]),
        exchange=str(parts["exchange"]),
        log_dir=Path(str(parts["log_dir"])),
    )
    load = Load(producers=producers, relay=relay, engine=engine)
    parts["load"] = load
    producers.start()
    # A small backlog first (full batches), then the relay while producers go on.
    harness.wait_until(
        lambda: producers.ledger.total() >= EVENTS // 10 or not producers.running(),
        120,
        "a backlog",
    )
    relay.start()
    return load


def crash_point(load: Load, node: pgcluster.Node) -> None:
    """Wait until the relay publishes and half the events are committed; producers still run."""
    assert harness.wait_publishing(node.url(), more_than=100), "the relay is not publishing"
    harness.wait_until(
        lambda: load.producers.ledger.total() >= EVENTS // 2 or not load.producers.running(),
        120,
        "half of the events",
    )
    assert load.producers.running(), "the producers stopped before the crash"


def load_after_crash(load: Load, committed_at_crash: int) -> None:
    """As many events again after the crash (on the new or restarted server), then stop."""
    harness.wait_until(
        lambda: (
            load.producers.ledger.total() >= committed_at_crash + EVENTS // 2
            or not load.producers.running()
        ),
        120,
        "the producers to resume",
    )
    load.producers.stop()


def finish(load: Load, parts: dict[str, object], node: pgcluster.Node) -> list[harness.Arrival]:
    """Let the producers finish and the relay drain ``node``; then consume the queue."""
    load.producers.join()
    harness.wait_until(lambda: harness.pending_count(node.url()) == 0, 120, "the relay to drain")
    load.relay.stop()
    log = load.relay.log_path.read_text()
    assert PASSWORD not in log, "the relay logged the database password"
    queue = parts["queue"]
    assert isinstance(queue, kombu.Queue)
    return harness.consume_all(str(parts["amqp_url"]), queue.name)


# -- the tests -----------------------------------------------------------------


LAGGING = "asynchronous, standby 1 s behind, relay back last"


# A known defect, reproduced in about one run of three (when the relay holds
# confirmed, unmarked rows at the crash): the relay keeps those positions across
# the outage and marks them on the new primary, whose sequence restarted below
# them; new events that took those positions are marked delivered unpublished.
# Not strict, since it does not reproduce every run; once fixed, drop the mark.
@pytest.mark.parametrize(
    "replication",
    [
        "synchronous",
        "asynchronous",
        LAGGING,
    ],
)
def test_relay_and_producers_follow_a_promoted_standby(
    cluster: pgcluster.Cluster, load_parts: dict[str, object], replication: str
) -> None:
    cluster.create_primary()
    cluster.create_standby()
    if replication == "synchronous":
        cluster.make_synchronous()
    url = cluster.multi_host_url(password=PASSWORD)
    outbox_cli(["migrate"], url)  # through the multi-host URL: it reaches the primary
    load = start_load(load_parts, url, seed=len(replication))
    old, new = cluster.primary, cluster.standby
    crash_point(load, old)

    committed_at_crash = load.producers.ledger.total()
    if replication == LAGGING:
        # What a slow network or a busy standby does: the primary commits on,
        # the standby falls behind by a second of commits.
        old.hold_walsender()
        time.sleep(1.0)
    primary_lsn, standby_replay = cluster.replication_lag()
    backlog = harness.pending_count(old.url())
    stopped = time.time()
    if replication == LAGGING:
        # The relay comes back after the producers (its back-off grows to
        # 30 s; theirs is the application's): frozen across the failover.
        assert load.relay.process is not None
        load.relay.process.send_signal(signal.SIGSTOP)
        old.crash_holding_walsender()
    else:
        old.crash()
    crashed = time.time()
    try:
        new.promote()
        promoted = time.time()
        if replication == LAGGING:
            harness.wait_until(
                lambda: load.producers.ledger.total() >= committed_at_crash + EVENTS // 3,
                120,
                "commits on the new primary",
            )
    finally:
        if load.relay.process is not None:
            load.relay.process.send_signal(signal.SIGCONT)
    load_after_crash(load, committed_at_crash)

    arrivals = finish(load, load_parts, new)
    outcome = account(load.producers, arrivals, new)
    # Marks after the old primary was gone: on the new primary.
    after_crash = first_mark_after(new, crashed)
    assert after_crash is not None, "nothing was delivered on the new primary"
    resumed = crashed - stopped + after_crash
    line = (
        f"failover ({replication}): crash {crashed - stopped:.2f}s, promote"
        f" {promoted - crashed:.2f}s, stop -> first delivery on the new primary {resumed:.2f}s;"
        f" acknowledged commits lost {outcome.lost} (of them delivered before the crash"
        f" {outcome.lost_but_delivered}); commits in doubt {outcome.doubtful}"
        f" (survived {outcome.doubtful_kept}); committed at the crash {committed_at_crash},"
        f" pending {backlog}; producer retries {load.producers.failures};"
        f" at the crash primary LSN {primary_lsn}, standby replayed {standby_replay}"
    )
    SUMMARY.append(line)  # the measurement, whatever the verdict below
    print(line)
    report = verify(outcome, new, fault=f"failover, {replication}", old=old)
    SUMMARY.append(f"    {report.line()}")
    print(report.line())
    assert report.committed + outcome.lost >= EVENTS
    if replication == "synchronous":
        # Every acknowledged commit had reached the standby: none may be missing.
        assert outcome.lost == 0, f"{outcome.lost} acknowledged commits lost"
    if replication == LAGGING:
        # A second of commits was never sent: the accounting must see them gone.
        assert outcome.lost > 0, "no commit was lost from a standby a second behind"


def test_crash_and_restart_makes_duplicates_never_losses(
    cluster: pgcluster.Cluster, load_parts: dict[str, object]
) -> None:
    node = cluster.primary
    cluster.create_primary()
    url = cluster.multi_host_url(password=PASSWORD)
    outbox_cli(["migrate"], url)
    load = start_load(load_parts, url, seed=7)
    crash_point(load, node)

    # Under load: producers commit (and flush the WAL) all the time.
    committed_at_crash = load.producers.ledger.total()
    stopped = time.time()
    node.crash()
    crashed = time.time()
    time.sleep(0.5)  # down for a moment, as a supervisor restarting it would leave it
    node.start()
    restarted = time.time()
    harness.wait_until(
        lambda: first_mark_after(node, crashed) is not None, 60, "a delivery after the restart"
    )
    after_crash = first_mark_after(node, crashed)
    assert after_crash is not None
    resumed = crashed - stopped + after_crash
    load_after_crash(load, committed_at_crash)
    load.producers.join()

    # Idle producers: the relay's last marks are asynchronous commits that no
    # producer's commit flushes along with its own. Crash the moment the
    # backlog reads empty; the rows whose marks the crash forgot are pending
    # again after the restart (or already marked again by the relay).
    forgotten_marks = 0
    crashes = 1
    for attempt in range(3):
        crash = crash_when_drained(node)
        crashes += 1
        node.start()
        forgotten_marks += node.query(
            "SELECT count(*) FROM outbox_event"
            " WHERE state <> 'delivered' OR delivered_at >= to_timestamp(%s)",
            (crash,),
        )[0][0]
        if forgotten_marks:
            break
        # A crash caught the WAL writer done: another burst to drain, another try.
        burst = FailoverProducers(load.engine, load.producers.keys, target=0, seed=attempt)
        burst.ledger, burst.doubt = load.producers.ledger, load.producers.doubt
        burst.target = load.producers.ledger.total() + 300
        burst.start()
        burst.join()

    arrivals = finish(load, load_parts, node)
    outcome = account(load.producers, arrivals, node)
    # The same server came back: every acknowledged commit is on it (the
    # producers commit synchronously); only the relay's marks could be forgotten.
    assert outcome.lost == 0, f"{outcome.lost} acknowledged commits lost"
    report = verify(outcome, node, fault="crash and restart")
    assert forgotten_marks > 0, "no crash forgot a mark: the test did not exercise it"
    assert report.duplicates >= forgotten_marks
    line = (
        f"crash and restart ({crashes} crashes): down {restarted - stopped:.2f}s, stop -> first"
        f" delivery after the restart {resumed:.2f}s; marks forgotten by the idle crash"
        f" {forgotten_marks}; commits in doubt"
        f" {outcome.doubtful} (survived {outcome.doubtful_kept}); committed at the crash under"
        f" load {committed_at_crash}; producer retries {load.producers.failures}"
    )
    SUMMARY.extend([line, f"    {report.line()}"])
    print(line, report.line(), sep="\n")
