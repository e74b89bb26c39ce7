"""The fault suite's moving parts: relay processes, producers, faults, and the checker.

Relays are real ``outbox relay`` processes. Producers are threads writing
through ``outbox.publish`` in SQLAlchemy sessions; each transaction bumps a
per-key version row (``fault_resource``) before publishing, so the version an
event carries is its commit order for that key, witnessed by PostgreSQL's row
lock independently of the outbox's own positions. The checker consumes the
queue and compares what arrived with what the producers committed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp
import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import outbox

SCHEMA = "https://example.org/schemas/case.json"
APP_NAME = "outbox-fault-relay"


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


# -- relays -------------------------------------------------------------------


class RelayProcess:
    """One ``outbox relay`` subprocess; restartable; logs to a file."""

    def __init__(
        self,
        name: str,
        *,
        database_url: str,
        amqp_url: str,
        exchange: str,
        log_dir: Path,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        # Run the relay through this (e.g. ``ip netns exec HOST``, which execs it: same PID).
        self.prefix = tuple(prefix)
        self.log_path = log_dir / f"{name}.log"
        separator = "&" if "?" in database_url else "?"
        self.env = {
            **os.environ,
            # The application name lets the suite find this relay's backends.
            "OUTBOX_DATABASE_URL": f"{database_url}{separator}application_name={APP_NAME}",
            "OUTBOX_BROKER_URL": amqp_url,
            "OUTBOX_EXCHANGE": exchange,
            "OUTBOX_LEASE_TTL": "2",
            "OUTBOX_POLL_INTERVAL": "0.2",
            "OUTBOX_CONFIRM_TIMEOUT": "3",
            "OUTBOX_BATCH_SIZE": "200",
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_LOG_LEVEL": "INFO",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "outbox.cli", "relay"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown, no release of leases, no final mark."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


# -- producers ----------------------------------------------------------------


@dataclass
class Ledger:
    """What the producers did: committed events (key, version) and rolled-back ids."""

    committed: dict[str, tuple[str, int]] = field(default_factory=dict)
    rolled_back: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[BaseException] = field(default_factory=list)

    def total(self) -> int:
        with self.lock:
            return len(self.committed)


def create_resources(engine: Engine, keys: list[str]) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE IF NOT EXISTS fault_resource"
                " (key text PRIMARY KEY, version integer NOT NULL DEFAULT 0)"
            )
        )
        connection.execute(
            text("INSERT INTO fault_resource (key) SELECT unnest(CAST(:keys AS text[]))"),
            {"keys": keys},
        )


_BUMP = text("UPDATE fault_resource SET version = version + 1 WHERE key = :k RETURNING version")


_BUMP = text("UPDATE fault_resource SET version = version + 1 WHERE key = :k RETURNING version")


def _envelope(key: str, version: int) -> outbox.Envelope:
    return outbox.Envelope(
        action=outbox.Action.UPDATE,
        schema=SCHEMA,
        content={"tenantId": 1, "id": int(key.rsplit(":", 1)[1]), "version": version},
    )


def produce_one(
    engine: Engine,
    keys: list[str],
    ledger: Ledger,
    rng: random.Random,
    *,
    rollback: bool = False,
    hold: float = 0.0,
) -> None:
    """One transaction: bump 1-3 keys' versions and publish one event for each."""
    chosen = sorted(rng.sample(keys, rng.randint(1, 3)))  # sorted: no deadlock on rows
    events: list[tuple[str, str, int]] = []
    with Session(engine) as session:
        session.begin()
        for key in chosen:
            version = session.execute(
                _BUMP,
                {"k": key},
            ).scalar_one()
            published = outbox.publish(session, _envelope(key, version), key=key)
            events.append((str(published), key, version))
        if hold:
            outbox.flush_events(session)  # the rows exist (positions taken) but are invisible
            time.sleep(hold)
        if rollback:
            session.rollback()
            with ledger.lock:
                ledger.rolled_back.update(e for e, _, _ in events)
            return
        session.commit()
    with ledger.lock:
        for event_id, key, version in events:
            ledger.committed[event_id] = (key, version)


class Producers:
    """``count`` threads committing (and sometimes rolling back) until ``target`` events."""

    def __init__(
        self, engine: Engine, keys: list[str], *, target: int, count: int = 4, seed: int = 0
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.target = target
        self.ledger = Ledger()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 100 + i,), daemon=True)
            for i in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while self.ledger.total() < self.target:
                produce_one(self.engine, self.keys, self.ledger, rng, rollback=rng.random() < 0.1)
        except BaseException as exc:
            self.ledger.errors.append(exc)

    def join(self, timeout: float = 300) -> None:
        for thread in self._threads:
            thread.join(timeout)
        if self.ledger.errors:
            raise self.ledger.errors[0]

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Commit no more transactions (those under way finish)."""
        self.target = 0


# -- faults -------------------------------------------------------------------


def relay_backends(database_url: str, database: str) -> list[tuple[int, str]]:
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (database, APP_NAME),
        ).fetchall()
    return [(int(pid), str(state)) for pid, state in rows]


def terminate_relay_backends(database_url: str, database: str, *, timeout: float = 10.0) -> int:
    """pg_terminate_backend on the relays' connections, preferably mid-query/transaction."""
    deadline = time.monotonic() + timeout
    busy: list[int] = []
    while time.monotonic() < deadline:
        backends = relay_backends(database_url, database)
        busy = [pid for pid, state in backends if state in ("active", "idle in transaction")]
        if busy:
            break
        time.sleep(0.002)
    targets = busy or [pid for pid, _ in relay_backends(database_url, database)]
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        for pid in targets:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(targets)


def established_sockets(pid: int, port: int) -> list[str]:
    """``ss`` lines of process ``pid``'s established TCP connections to ``port``."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def broker_connection_names(pid: int) -> list[str]:
    """RabbitMQ's names ("local -> 127.0.0.1:5672") of the AMQP connections of process ``pid``."""
    names = []
    for line in established_sockets(pid, 5672):
        parts = line.split()
        local, peer = parts[2], parts[3]
        names.append(f"{local} -> {peer}")
    return names


def close_broker_connections(pid: int) -> int:
    """Close process ``pid``'s AMQP connections from the broker side (rabbitmqctl)."""
    names = set(broker_connection_names(pid))
    if not names:
        return 0
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "pid", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    closed = 0
    for line in listing.splitlines():
        erlang_pid, _, name = line.partition("\t")
        if name.strip() in names:
            result = subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", erlang_pid, "outbox fault suite"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            closed += result.returncode == 0
    return closed


def database_ports(pid: int) -> list[int]:
    """Local ports of process ``pid``'s PostgreSQL connections (``client_port`` of its backends)."""
    return [int(line.split()[2].rsplit(":", 1)[1]) for line in established_sockets(pid, 5432)]


# A backend of the relay idle inside a transaction that wrote rows (it holds row locks).
_IDLE_WRITER = (
    "SELECT pid, clock_timestamp(), left(query, 60) FROM pg_stat_activity"
    " WHERE application_name = %s AND client_port = ANY(%s)"
    " AND state IN ('idle in transaction', 'idle in transaction (aborted)')"
    " AND backend_xid IS NOT NULL"
)


@dataclass(frozen=True)
class Freeze:
    backend: int  # the frozen relay's backend idle in its transaction
    at: Any  # the database's clock when it was seen frozen so (datetime)
    attempts: int  # SIGSTOPs needed to land in that state
    last_statement: str  # the frozen transaction's last statement


def freeze_in_transaction(
    relay: RelayProcess, database_url: str, *, timeout: float = 20.0
) -> Freeze | None:
    """SIGSTOP ``relay`` while one of its backends is idle in a transaction holding row locks.

    Watches pg_stat_activity for such a backend of the relay's connections,
    stops the process at once, and checks, once a statement already sent had
    time to finish, that a backend is still in that state; otherwise it lets
    the relay go on (SIGCONT) and tries again, until ``timeout``. Returns None
    when it never landed; the relay is then running.
    """
    process = relay.process
    assert process is not None
    deadline = time.monotonic() + timeout
    attempts = 0
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        ports: list[int] = []
        polls = 0
        while time.monotonic() < deadline:
            if polls % 200 == 0:  # the pool opens a connection now and then
                ports = database_ports(relay.pid)
            polls += 1
            if conn.execute(_IDLE_WRITER, (APP_NAME, ports)).fetchone() is None:
                continue
            process.send_signal(signal.SIGSTOP)
            attempts += 1
            time.sleep(0.02)
            row = conn.execute(_IDLE_WRITER, (APP_NAME, ports)).fetchone()
            if row is not None:
                return Freeze(
                    backend=int(row[0]), at=row[1], attempts=attempts, last_statement=str(row[2])
                )
            process.send_signal(signal.SIGCONT)
    return None


def restart_broker(down_seconds: float) -> None:
    """Stop RabbitMQ's application, keep it down ``down_seconds``, start it again.

    The Erlang node stays up (rabbitmqctl can reach it); every connection is
    dropped, durable queues and persistent messages survive, as they do when
    the broker restarts. Returns once the broker takes connections again.
    """

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=120, check=True)

    ctl("stop_app")
    try:
        time.sleep(down_seconds)
    finally:
        ctl("start_app")
        ctl("await_startup")


# -- waiting and checking ------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pending_count(database_url: str) -> int:
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox_event WHERE state <> 'delivered'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def delivered_count(database_url: str) -> int:
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_event WHERE state = 'delivered'").fetchone()
    assert row is not None
    return int(row[0])


def wait_publishing(database_url: str, *, more_than: int = 100, timeout: float = 30.0) -> bool:
    """Wait until the relays delivered ``more_than`` further rows: they are mid-stream."""
    start = delivered_count(database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if delivered_count(database_url) > start + more_than:
            return True
        time.sleep(0.02)
    return False


@dataclass(frozen=True)
class Arrival:
    message_id: str
    ce_id: str
    key: str
    version: int


def consume_all(amqp_url: str, queue: str, *, quiet: float = 1.0) -> list[Arrival]:
    """Every message in ``queue``, in queue order (the relays are stopped by now)."""
    host, user, password, vhost = _amqp_parts(amqp_url)
    connection = amqp.Connection(host, userid=user, password=password, virtual_host=vhost)
    connection.connect()
    channel = connection.channel()
    channel.basic_qos(0, 1000, False)
    arrivals: list[Arrival] = []

    def on_message(message: Any) -> None:
        headers = message.properties.get("application_headers") or {}
        body = json.loads(message.body)
        arrivals.append(
            Arrival(
                message_id=str(message.properties.get("message_id")),
                ce_id=str(headers.get("ce-id")),
                key=str(headers.get("outbox-key")),
                version=int(body["resource"]["content"]["version"]),
            )
        )

    channel.basic_consume(queue, callback=on_message, no_ack=True)
    while True:
        try:
            connection.drain_events(timeout=quiet)
        except TimeoutError:
            break  # nothing for `quiet` seconds: the queue is empty
    connection.close()
    return arrivals


def _amqp_parts(url: str) -> tuple[str, str, str, str]:
    import kombu

    parsed = kombu.Connection(url)
    return f"{parsed.hostname}:{parsed.port or 5672}", parsed.userid, parsed.password, "/"


@dataclass
class Report:
    fault: str
    committed: int
    rolled_back: int
    arrivals: int
    duplicates: int
    faults_injected: int

    def line(self) -> str:
        return (
            f"{self.fault:<44} committed {self.committed:>6}  rolled back {self.rolled_back:>5}"
            f"  arrived {self.arrivals:>6}  duplicates {self.duplicates:>5}"
            f"  faults {self.faults_injected}"
        )


def check(ledger: Ledger, arrivals: list[Arrival], *, fault: str, injected: int) -> Report:
    """Assert the delivery guarantees; return the numbers for the summary."""
    committed = ledger.committed
    arrived_ids = {a.message_id for a in arrivals}
    missing = set(committed) - arrived_ids
    assert not missing, f"{len(missing)} committed events never arrived, e.g. {sorted(missing)[:3]}"
    ghosts = ledger.rolled_back & arrived_ids
    assert not ghosts, f"{len(ghosts)} rolled-back events arrived, e.g. {sorted(ghosts)[:3]}"
    unknown = arrived_ids - set(committed)
    assert not unknown, f"{len(unknown)} arrivals were never committed: {sorted(unknown)[:3]}"

    # Every copy of an event (same key and version) carries the original id.
    ids_of: dict[tuple[str, int], set[str]] = defaultdict(set)
    for a in arrivals:
        assert a.ce_id == a.message_id, f"ce-id {a.ce_id} != message id {a.message_id}"
        ids_of[(a.key, a.version)].add(a.message_id)
        assert committed[a.message_id] == (a.key, a.version), f"{a} does not match its id"
    changed = {k: ids for k, ids in ids_of.items() if len(ids) > 1}
    assert not changed, f"duplicates with a new message id: {list(changed.items())[:3]}"

    # Per key, first arrivals in commit order (versions strictly increasing).
    seen: set[str] = set()
    last: dict[str, int] = {}
    for a in arrivals:
        if a.message_id in seen:
            continue
        seen.add(a.message_id)
        previous = last.get(a.key, 0)
        assert a.version > previous, (
            f"key {a.key}: version {a.version} arrived first after version {previous}"
        )
        last[a.key] = a.version
    return Report(
        fault=fault,
        committed=len(committed),
        rolled_back=len(ledger.rolled_back),
        arrivals=len(arrivals),
        duplicates=len(arrivals) - len(arrived_ids),
        faults_injected=injected,
    )


def keys_for_run(count: int = 300) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"case-{run}:{i}" for i in range(count)]
