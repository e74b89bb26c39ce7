"""Relays on hosts of their own: cut off from the database, frozen, cut off from the broker.

Run with ``pytest -m hosts tests/hosts`` (root; excluded from the default run).
Two ``outbox relay`` processes run in network namespaces ``outbox-h1`` and
``outbox-h2`` and reach a PostgreSQL and a RabbitMQ of the suite's own over
veth links (see ``harness``). Producers in the root namespace bump per-key
version rows (``tests.faults.harness``), so an event's version is its commit
order for its key.

Each relay publishes to an exchange of its own, both bound to the same two
queues; RabbitMQ tells a consumer which exchange a delivery was published to,
so every arrival names the relay (the one publishing connection) that sent
it. One queue is consumed live to time the arrivals; the other is consumed at
the end and checked: every committed event arrived, none of a rolled-back
transaction, first arrivals per key in commit order, duplicates with their
original id.

Relay 1's link to the broker is slow (``throttle``) while it is cut off or
frozen, with a small window: its lanes are then full of rows it could still
send when its lease runs out, so that what stops it is its fence and nothing
else (a relay that keeps up with the producers has sent everything within
milliseconds of the cut, and the test could not fail). The window keeps what
it wrote before the deadline small, so it reaches the broker well before the
database's lease expires (see the docs on what a large window on a slow link
does).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from outbox.envelope.ordering import partition_of
from tests.faults import harness as faults
from tests.hosts import harness
from tests.hosts.conftest import SUMMARY, Lab

pytestmark = pytest.mark.hosts

# The relays' OUTBOX_LEASE_TTL (faults.RelayProcess's 2 s unless overridden); every
# cut and freeze lasts a multiple of it.
TTL = float(os.environ.get("OUTBOX_HOSTS_LEASE_TTL", "2"))
PARTITIONS = 16
# The slow link: about 40 messages (490 bytes each) a second; the four a window of
# four holds drain in 0.1 s. A batch of 1000 keeps 500 to 1500 rows in the lanes:
# more than the relay could send in the seconds a cut lasts.
SLOW_LINK = "160kbit"
SLOW_WINDOW = 4
SLOW_BATCH = 1000
# A second for a loaded two-core test machine, on top of each bound.
SLACK = 1.0


def hot_keys(run: str) -> list[str]:
    """One key per partition: every relay owns some, each with a deep backlog."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < PARTITIONS:
        key = f"hot-{run}:{i}"
        keys.setdefault(partition_of(key, PARTITIONS), key)
        i += 1
    return sorted(keys.values())


def merged(*ledgers: faults.Ledger) -> faults.Ledger:
    out = faults.Ledger()
    for ledger in ledgers:
        out.committed.update(ledger.committed)
        out.rolled_back |= ledger.rolled_back
    return out


class Stage:
    """Two relays (on outbox-h1 and outbox-h2), producers, a live consumer, a lease watcher."""

    def __init__(self, lab: Lab, database: str, engine: Engine, log_dir: Path) -> None:
        self.lab = lab
        self.engine = engine
        self.url = lab.pg.url_from_hosts(database)
        self.libpq = faults.libpq(self.url)
        run = uuid.uuid4().hex[:6]
        self.exchanges = [f"hosts-{run}-h1", f"hosts-{run}-h2"]
        self.check_queue, self.timing_queue = f"hosts-{run}-check", f"hosts-{run}-timing"
        host1, host2 = lab.network.hosts
        self.relays = [
            faults.RelayProcess(
                f"relay-h{host.index}",
                database_url=self.url,
                amqp_url=lab.rabbit.amqp_url,
                exchange=exchange,
                log_dir=log_dir,
                prefix=host.prefix,
            )
            for host, exchange in zip((host1, host2), self.exchanges, strict=True)
        ]
        for relay in self.relays:
            relay.env["OUTBOX_LEASE_TTL"] = f"{TTL:g}"
        self.relays[0].env["OUTBOX_WINDOW"] = str(SLOW_WINDOW)
        self.relays[0].env["OUTBOX_BATCH_SIZE"] = str(SLOW_BATCH)
        self.hot = hot_keys(run)
        self.cold = [f"cold-{run}:{i}" for i in range(150)]
        self.producers = [
            faults.Producers(engine, self.hot, target=10**9, count=2, seed=1),
            faults.Producers(engine, self.cold, target=10**9, count=2, seed=2),
        ]
        self.recorder = harness.Recorder(lab.rabbit.amqp_url, self.timing_queue)
        self.watcher = harness.LeaseWatcher(self.libpq)

    @property
    def h1(self) -> faults.RelayProcess:
        return self.relays[0]

    @property
    def h2(self) -> faults.RelayProcess:
        return self.relays[1]

    def tag(self, relay: faults.RelayProcess) -> str:
        return f":{relay.pid}:"

    def start(self) -> None:
        self.lab.rabbit.declare(self.exchanges, [self.check_queue, self.timing_queue])
        faults.create_resources(self.engine, self.hot + self.cold)
        self.recorder.start()
        self.watcher.start()
        for producers in self.producers:
            producers.start()
        for relay in self.relays:
            relay.start()
        faults.wait_until(
            lambda: self._owners() == {self.tag(r) for r in self.relays}, 30, "both relays to lease"
        )
        faults.wait_until(lambda: len(self.recorder.of(self.exchanges[0])) > 200, 30, "relay 1")

    def _owners(self) -> set[str]:
        sample = self.watcher.samples[-1] if self.watcher.samples else None
        if sample is None:
            return set()
        return {t for t in (self.tag(r) for r in self.relays) if sample.live(t)}

    def pending_of(self, relay: faults.RelayProcess) -> int:
        """Rows waiting in the partitions ``relay`` leases."""
        held = sorted(self.watcher.samples[-1].live(self.tag(relay)))
        with psycopg.connect(self.libpq, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM outbox_event WHERE state = 'pending' AND partition = ANY(%s)",
                (held,),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def next_renewal(self, relay: faults.RelayProcess, *, after: float) -> float:
        """Wait for ``relay``'s next lease renewal; sleep until ``after`` seconds past it.

        Returns the renewal's time on the database's clock (its expiry - TTL).
        """
        tag = self.tag(relay)

        def expiry() -> float:
            sample = self.watcher.samples[-1]
            return max((e for o, e, _ in sample.leases.values() if tag in o), default=0.0)

        before = expiry()
        faults.wait_until(lambda: expiry() > before, 5, "a lease renewal")
        renewed = expiry() - TTL
        time.sleep(max(0.0, renewed + after - time.time()))
        return renewed

    def finish(self) -> faults.Report:
        """Heal everything, let the relays drain, stop; check the queue; return the numbers."""
        for host in self.lab.network.hosts:
            self.lab.network.heal(host)
        try:
            for producers in self.producers:
                producers.stop()
            for producers in self.producers:
                producers.join()
            faults.wait_until(
                lambda: faults.pending_count(self.url) == 0, 120, "the relays to drain"
            )
        finally:
            self.close()
        ledger = merged(*(p.ledger for p in self.producers))
        arrivals = faults.consume_all(self.lab.rabbit.amqp_url, self.check_queue)
        return faults.check(ledger, arrivals, fault="hosts", injected=1)

    def close(self) -> None:
        for producers in self.producers:
            producers.stop()
        for relay in self.relays:
            if relay.alive():
                os.kill(relay.pid, signal.SIGCONT)
            relay.stop()
        self.watcher.stop()
        self.recorder.stop()

    def ledger(self) -> faults.Ledger:
        return merged(*(p.ledger for p in self.producers))

    def partition_of_event(self) -> dict[str, int]:
        return {
            event_id: partition_of(key, PARTITIONS)
            for event_id, (key, _) in self.ledger().committed.items()
        }


@pytest.fixture
def stage(lab: Lab, database: str, engine: Engine, tmp_path: Path) -> Iterator[Stage]:
    stage = Stage(lab, database, engine, tmp_path)
    try:
        yield stage
    finally:
        stage.close()
        for host in lab.network.hosts:
            lab.network.heal(host)


@pytest.mark.parametrize("how", ["drop", "unreachable"])
def test_relay_cut_off_from_the_database(stage: Stage, lab: Lab, how: str) -> None:
    """Host 1 loses PostgreSQL, keeps RabbitMQ: it stops publishing before its lease expires.

    The cut lands just before the relay's next renewal, where a relay that
    went on until its database connection failed (tcp_user_timeout = TTL after
    the first statement the cut swallowed) would overrun its lease the most.
    """
    host1 = lab.network.hosts[0]
    stage.start()
    lab.network.throttle(host1, harness.BROKER_ADDRESS, SLOW_LINK)
    lab.network.prepare(host1)
    faults.wait_until(
        lambda: stage.pending_of(stage.h1) > 2 * SLOW_BATCH, 60, "a backlog on relay 1"
    )
    stage.next_renewal(stage.h1, after=0.25)
    lab.network.cut(host1, harness.PG_ADDRESS, how=how)
    cut_at = time.time()
    # The broker's own count of what relay 1's connections sent, sampled until the heal:
    # compared from the first sample after its lease ran out.
    counts: list[tuple[float, dict[int, int]]] = []
    while time.time() < cut_at + 3 * TTL:
        counts.append((time.time(), harness.broker_bytes_from(host1)))
        time.sleep(0.05)
    healed_at = time.time()
    lab.network.heal(host1)
    report = stage.finish()

    expiry = stage.watcher.lease_end(stage.h1.pid, cut_at, healed_at)
    sent = [r.at for r in stage.recorder.of(stage.exchanges[0]) if r.at <= healed_at]
    last = max(sent)
    late = [at for at in sent if at > expiry]
    all_partitions = stage.watcher.first(lambda s: len(s.live(stage.tag(stage.h2))) == 16, cut_at)
    counted_from, bytes_before = next((c for c in counts if c[0] >= expiry), counts[-1])
    bytes_after = counts[-1][1]
    grown = {port: bytes_after.get(port, 0) - before for port, before in bytes_before.items()}
    line = (
        f"cut from PostgreSQL ({how}): relay 1's last arrival {last - expiry:+.2f}s from its"
        f" lease expiry ({last - cut_at:+.2f}s after the cut; {len(late)} later);"
        f" relay 2 leased all {_since(all_partitions, expiry)} after it;"
        f" relay 1's connections got {grown} bytes while expired; "
        f"duplicates {report.duplicates}/{report.committed}"
    )
    print(line)
    SUMMARY.append(line)
    assert not late, line
    # It still had rows and the broker after the cut: only its lease stopped it.
    assert last > cut_at, line
    assert all_partitions is not None and all_partitions - expiry <= TTL / 5 + SLACK, line
    # Heartbeats at most (8 bytes a frame), no publish (hundreds of bytes each), no new
    # connection (it would not be in bytes_before).
    assert counted_from >= expiry and counted_from < expiry + 0.5, line
    assert grown and all(0 <= delta < 64 for delta in grown.values()), line
    assert set(bytes_after) == set(bytes_before), line


def test_relay_frozen_past_its_lease(stage: Stage, lab: Lab) -> None:
    """SIGSTOP relay 1 for 3 TTL while it publishes, SIGCONT: nothing of its old lease after.

    What it had written into its socket before the freeze still reaches the
    broker while it is frozen (the kernel sends it); the assertion is that
    none of it, nor anything else of relay 1, arrives between its lease's
    expiry and the moment it holds partitions again by a new lease.
    """
    host1 = lab.network.hosts[0]
    stage.start()
    lab.network.throttle(host1, harness.BROKER_ADDRESS, SLOW_LINK)
    faults.wait_until(
        lambda: stage.pending_of(stage.h1) > 2 * SLOW_BATCH, 60, "a backlog on relay 1"
    )
    os.kill(stage.h1.pid, signal.SIGSTOP)
    frozen_at = time.time()
    time.sleep(3 * TTL)
    lab.network.heal(host1)
    thawed_at = time.time()
    os.kill(stage.h1.pid, signal.SIGCONT)
    faults.wait_until(
        lambda: bool(stage.watcher.samples[-1].live(stage.tag(stage.h1))), 30, "relay 1 back"
    )
    time.sleep(1.0)
    report = stage.finish()

    expiry = stage.watcher.lease_end(stage.h1.pid, frozen_at, thawed_at)
    relet = next(
        (
            event["at"]
            for event in harness.relay_log(stage.h1.log_path)
            if event["event"] == "relay_partitions_changed"
            and event["at"] > thawed_at
            and event["partitions"]
        ),
        None,
    )
    assert relet is not None, "relay 1 never published again"
    arrivals = [r.at for r in stage.recorder.of(stage.exchanges[0])]
    in_socket = [at for at in arrivals if frozen_at < at < thawed_at]
    stale = [at for at in arrivals if expiry < at < relet]
    all_partitions = stage.watcher.first(
        lambda s: len(s.live(stage.tag(stage.h2))) == 16, frozen_at
    )
    drained = f"{max(in_socket) - frozen_at:.2f}s" if in_socket else "-"
    line = (
        f"SIGSTOP {3 * TTL:g}s: lease expired {expiry - frozen_at:.2f}s after the freeze;"
        f" {len(in_socket)} arrivals written before it (last after {drained});"
        f" relay 2 leased all {_since(all_partitions, expiry)} after expiry;"
        f" relay 1 leased again {relet - thawed_at:.2f}s after SIGCONT, {len(stale)} stale"
        f" arrivals; duplicates {report.duplicates}/{report.committed}"
    )
    print(line)
    SUMMARY.append(line)
    assert not stale, line
    assert all(at < expiry for at in in_socket), line
    assert all_partitions is not None and all_partitions - expiry <= TTL / 5 + SLACK, line


def test_relay_cut_off_from_the_broker(stage: Stage, lab: Lab) -> None:
    """Host 1 loses RabbitMQ, keeps PostgreSQL: it marks nothing the broker did not confirm.

    Its window is out when the link goes, and the confirms never come. No row
    of a partition it held is marked delivered during the cut (after the
    confirms it had already had), and after the heal everything arrives, in
    order. Once a connect fails it releases its partitions (``relay_stood_down``)
    and claims none until it reaches the broker again (docs/replicas.md).
    """
    host1 = lab.network.hosts[0]
    stage.start()
    cut_for = 4 * TTL  # past confirm_timeout (3 s) and the broker connect timeout (5 s)
    cut_at = time.time()
    lab.network.cut(host1, harness.BROKER_ADDRESS)
    time.sleep(cut_for)
    healed_at = time.time()
    lab.network.heal(host1)
    report = stage.finish()

    # The last confirm it can have had left the broker at cut_at; it marks within 0.1 s
    # (_MARK_AFTER) once its marking thread is free: a second is ample.
    marked_late = _marked_while_holding(stage, stage.h1, cut_at + SLACK, healed_at)
    samples = [s for s in stage.watcher.samples if cut_at <= s.at <= healed_at]
    holding = sum(bool(s.live(stage.tag(stage.h1))) for s in samples) / max(1, len(samples))
    arrived = [r.at for r in stage.recorder.of(stage.exchanges[0]) if cut_at + 0.5 < r.at]
    through = [at for at in arrived if at < healed_at]
    stall = _longest_stall(stage, cut_at, healed_at)
    log = [e for e in harness.relay_log(stage.h1.log_path) if cut_at < e["at"] < healed_at + 1]
    events = [e["event"] for e in log]
    held_before: int | None = None
    for sample in samples:
        held = len(sample.live(stage.tag(stage.h1)))
        if held != held_before:
            print(f"  {sample.at - cut_at:+6.2f}s relay 1 holds {held} partitions")
            held_before = held
    print("relay 1 during the cut:")
    for e in log:
        print(f"  {e['at'] - cut_at:+6.2f}s {e['event']} {e['message'][:90]}")
    stood_down = next((e["at"] for e in log if e["event"] == "relay_stood_down"), None)
    reclaimed = [
        s.at - cut_at
        for s in samples
        if stood_down is not None and s.at > stood_down + 0.1 and s.live(stage.tag(stage.h1))
    ]
    line = (
        f"cut from RabbitMQ {cut_for:g}s: relay 1 held leases in {holding:.0%} of the samples,"
        f" stood down {_since(stood_down, cut_at)} after the cut and claimed"
        f" {'nothing' if not reclaimed else f'again at {reclaimed[0]:+.2f}s'} until the heal,"
        f" its partitions changed {events.count('relay_partitions_changed')} times;"
        f" marked {len(marked_late)} rows while cut off; longest stall of a partition"
        f" {stall:.2f}s; duplicates {report.duplicates}/{report.committed}"
    )
    print(line)
    SUMMARY.append(line)
    assert not through, f"{len(through)} messages crossed a cut link"
    assert not marked_late, line
    assert "relay_broker_unavailable" in events or "relay_publish_failed" in events, events
    # Once a connect failed, it hands its partitions over and claims none while cut off.
    assert stood_down is not None, events
    assert not reclaimed, line


def _marked_while_holding(
    stage: Stage, relay: faults.RelayProcess, since: float, until: float
) -> list[int]:
    """Positions delivered in (since, until) in a partition only ``relay`` held around then."""
    with psycopg.connect(stage.libpq, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT position, partition, delivered_at FROM outbox_event"
            " WHERE delivered_at > to_timestamp(%s) AND delivered_at < to_timestamp(%s)",
            (since, until),
        ).fetchall()
    tag = stage.tag(relay)
    samples = stage.watcher.samples
    marked = []
    for position, partition, delivered_at in rows:
        at = delivered_at.timestamp()
        around = [s for s in samples if at - 0.2 <= s.at <= at + 0.2]
        if around and all(partition in s.live(tag) for s in around):
            marked.append(int(position))
    return marked


def _longest_stall(stage: Stage, since: float, until: float) -> float:
    """The longest time in (since, until) any partition went without a first arrival."""
    partition_of_event = stage.partition_of_event()
    last: dict[int, float] = dict.fromkeys(range(PARTITIONS), since)
    longest = 0.0
    seen: set[str] = set()
    for received in stage.recorder.received:
        if received.message_id in seen or not since < received.at < until:
            continue
        seen.add(received.message_id)
        partition = partition_of_event.get(received.message_id)
        if partition is None:
            continue
        longest = max(longest, received.at - last[partition])
        last[partition] = received.at
    return max(longest, *(until - at for at in last.values()))


def _since(moment: float | None, origin: float) -> str:
    return "never" if moment is None else f"{moment - origin:+.2f}s"
