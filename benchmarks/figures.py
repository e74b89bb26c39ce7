"""``python -m benchmarks``: the relay's performance figures, each against a baseline.

Every figure is measured next to its baseline in the same run, on a fresh
PostgreSQL database the command creates (and drops) and on a fresh exchange
and queue (deleted afterwards), and printed as one table::

    figure | value | baseline | ratio

See docs/performance.md for what each row means and the figures measured on
the reference machine. The machine's other load shows up in the numbers: run
it on a quiet host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import amqp
import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from benchmarks import attribution
from benchmarks.cpu import GROUPS, CpuUse, measure_cpu, process_cpu
from outbox.envelope import ordering
from outbox.producer.publish import ProducerOptions, prepare_row
from outbox.redaction import redact
from outbox.relay.frames import PublishEncoder, write_batch
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.message import OutgoingMessage, build_message
from outbox.relay.publisher import AmqpPublisher
from outbox.schemas.registry import relay_hooks
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore

SCHEMA = "https://example.org/schemas/case.json"
KEYS = 1000
CONTENT_BYTES = 1024
DEFAULT_PG = os.environ.get("OUTBOX_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DEFAULT_AMQP = os.environ.get("OUTBOX_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


@dataclass(frozen=True, kw_only=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline: float | None
    baseline_name: str
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or abs(self.baseline) < 0.5:
            return None
        return self.value / self.baseline


@dataclass(frozen=True, kw_only=True)
class Context:
    admin_url: str
    database_url: str
    amqp_url: str
    exchange: str
    queue: str
    events: int
    batch_size: int


# -- set-up -----------------------------------------------------------------


def _with_database(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"outbox_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(admin_url, name)
    try:
        engine = create_outbox_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_queue(amqp_url: str) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:10]
    exchange, queue = f"outbox-bench-{suffix}", f"outbox-bench-{suffix}"
    with amqp_channel(amqp_url) as channel:
        channel.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
        channel.queue_declare(queue, durable=True, auto_delete=False)
        channel.queue_bind(queue, exchange, "#")
    try:
        yield exchange, queue
    finally:
        with amqp_channel(amqp_url) as channel:
            channel.queue_delete(queue)
            channel.exchange_delete(exchange)


@contextmanager
def amqp_channel(amqp_url: str) -> Iterator[Any]:
    import kombu

    with kombu.Connection(amqp_url) as connection:
        connection.connect()
        yield connection.default_channel


def _plain_connection(amqp_url: str) -> amqp.Connection:
    """A bare py-amqp connection to the broker of ``amqp_url`` (no kombu in between)."""
    import kombu

    parsed = kombu.Connection(amqp_url)
    return amqp.Connection(
        f"{parsed.hostname}:{parsed.port or 5672}",
        userid=parsed.userid,
        password=parsed.password,
        virtual_host=parsed.virtual_host or "/",
    )


def purge(ctx: Context) -> None:
    with amqp_channel(ctx.amqp_url) as channel:
        channel.queue_purge(ctx.queue)


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def seed_pending(
    url: str,
    count: int,
    *,
    state: str = "pending",
    content_bytes: int = 1024,
    key_count: int = KEYS,
) -> None:
    """``count`` valid events with ``content_bytes`` of content over ``key_count`` keys."""
    keys = [f"case:1:{i}" for i in range(key_count)]
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        partitions = conn.execute("SELECT count(*) FROM outbox_partition").fetchone()
        assert partitions is not None
        parts = [ordering.partition_of(k, partitions[0]) for k in keys]
        # The padding makes the whole content object content_bytes long.
        head = '{"tenantId":1,"id":%s,"version":%s,"text":"'
        pad = max(0, content_bytes - len(head) - 2 - 12)
        conn.execute(
            """
            INSERT INTO outbox_event (event_id, ordering_key, partition, routing_key,
                                      resource_type, payload, state, delivered_at)
            SELECT gen_random_uuid(), (%(keys)s::text[])[i %% %(n)s + 1],
                   (%(parts)s::int[])[i %% %(n)s + 1], 'case.update', 'case',
                   '{"action":"update","resource":{"schema":"' || %(schema)s
                   || '","content":{"tenantId":1,"id":' || (i %% %(n)s)
                   || ',"version":' || i || ',"text":"' || repeat('x', %(pad)s) || '"}}}',
                   %(state)s::text, CASE WHEN %(state)s::text = 'delivered' THEN now() END
            FROM generate_series(1, %(count)s) AS i
            """,
            {
                "keys": keys,
                "parts": parts,
                "n": key_count,
                "schema": SCHEMA,
                "pad": pad,
                "count": count,
                "state": state,
            },
        )
        conn.execute("VACUUM ANALYZE outbox_event")
        # Start the measurement with the seeding's dirty pages on disk, so that
        # no checkpoint triggered by the seeding runs during the drain.
        conn.execute("CHECKPOINT")


def outgoing_messages(store: SqlStore, settings: RelaySettings) -> list[OutgoingMessage]:
    """The relay's messages for every pending row, built exactly as the relay builds them."""
    rows = store.fetch_pending(list(range(store.partition_count())), 10_000_000)
    return [
        build_message(
            row,
            json.loads(row.payload)["action"],
            json.loads(row.payload)["resource"]["schema"],
            source=settings.source,
            type_prefix=settings.type_prefix,
        )
        for row in rows
    ]


# -- figure 1: drain throughput ---------------------------------------------


def window_publish_rate(ctx: Context, messages: Sequence[OutgoingMessage], window: int) -> float:
    """The broker's limit for these messages: a sliding window of ``window`` unconfirmed.

    No database, no per-message bookkeeping: the frames are encoded before the
    clock starts (the relay's own encoder, so the same bytes the relay sends),
    written in chunks as confirms free room, and the confirms only counted.
    """
    connection = _plain_connection(ctx.amqp_url)
    connection.connect()
    channel = connection.channel()
    channel.confirm_select()
    encoder = PublishEncoder(
        channel_id=channel.channel_id, exchange=ctx.exchange, frame_max=connection.frame_max
    )
    frames = [encoder.encode(m) for m in messages]
    confirmed = [0]

    def on_ack(tag: int, multiple: bool) -> None:
        confirmed[0] = max(confirmed[0], tag) if multiple else confirmed[0] + 1

    def on_nack(tag: int, multiple: bool) -> None:
        raise RuntimeError("the broker nacked a baseline message")

    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    write = connection.transport.write
    total = len(frames)
    sent = 0
    start = time.perf_counter()
    while confirmed[0] < total:
        room = min(window - (sent - confirmed[0]), total - sent)
        if room > 0:
            # Chunks of at most 100 messages: the socket is fed while confirms come back.
            chunk = min(room, 100)
            write_batch(write, frames[sent : sent + chunk])
            sent += chunk
            if sent - confirmed[0] < window and sent < total:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0)
                continue
        connection.drain_events(timeout=30)
    elapsed = time.perf_counter() - start
    connection.close()
    return total / elapsed


BASELINE_WINDOWS = (500, 2000)


def best_window_rate(ctx: Context, messages: Sequence[OutgoingMessage]) -> tuple[float, int]:
    """The best of the sliding-window publisher over BASELINE_WINDOWS (rate, window)."""
    best = (0.0, 0)
    for window in BASELINE_WINDOWS:
        rate = window_publish_rate(ctx, messages, window)
        purge(ctx)
        best = max(best, (rate, window))
    return best


def plain_amqp_rate(ctx: Context, messages: Sequence[OutgoingMessage]) -> float:
    """py-amqp's own basic_publish loop with confirms waited for per batch (a reference)."""
    connection = _plain_connection(ctx.amqp_url)
    connection.connect()
    channel = connection.channel()
    channel.confirm_select()
    acked = [0]

    def on_ack(tag: int, multiple: bool) -> None:
        acked[0] = tag

    channel.events["basic_ack"].add(on_ack)
    start = time.perf_counter()
    tag = 0
    for i in range(0, len(messages), ctx.batch_size):
        for m in messages[i : i + ctx.batch_size]:
            channel.basic_publish(
                amqp.Message(
                    m.body,
                    content_type=m.content_type,
                    delivery_mode=2,
                    message_id=m.message_id,
                    timestamp=int(m.timestamp.timestamp()),
                    application_headers=m.headers,
                ),
                exchange=ctx.exchange,
                routing_key=m.routing_key,
                mandatory=True,
            )
            tag += 1
        while acked[0] < tag:
            connection.drain_events(timeout=30)
    elapsed = time.perf_counter() - start
    connection.close()
    return len(messages) / elapsed


def drain_rate(ctx: Context, engine: Engine, events: int | None = None) -> float:
    """In-process: a Relay object draining the backlog (an extra row, not the headline)."""
    relay = Relay(
        SqlStore(engine),
        AmqpPublisher(ctx.amqp_url, ctx.exchange),
        RelaySettings(batch_size=ctx.batch_size),
        **relay_hooks(engine),
    )
    relay.publisher.connect()
    # Register and lease before the clock starts, as a running relay would have.
    relay._maybe_rebalance(time.monotonic())
    start = time.perf_counter()
    published = relay.drain(timeout=600)
    elapsed = time.perf_counter() - start
    expected = ctx.events if events is None else events
    if published != expected:
        raise RuntimeError(f"the relay published {published} of {expected} events")
    return published / elapsed


def relay_process_drain_rate(
    ctx: Context, events: int | None = None
) -> tuple[float, float, CpuUse]:
    """A real ``outbox relay`` process, default settings, draining the seeded backlog.

    The clock starts when the process holds its partitions (its start-up,
    imports and connections excluded, as for a relay already running when a
    backlog forms) and stops when no row is pending: every event confirmed by
    the broker and marked delivered. Returns the rate, the CPU seconds the
    relay process used meanwhile, and the CPU by process group, read before
    the relay stops (its PostgreSQL backends exit with it).
    """
    expected = ctx.events if events is None else events
    relay = _relay_process(ctx)
    try:
        # Polled every 2 ms: the relay drains before the clock starts for as long as that.
        _wait_for_owner(ctx, 60.0, poll=0.002, process=relay)
        database = psycopg.connect(libpq(ctx.database_url), autocommit=True)
        with database as conn, measure_cpu() as use:
            start = time.perf_counter()
            cpu_start = process_cpu(relay.pid)
            while conn.execute(
                "SELECT EXISTS (SELECT 1 FROM outbox_event WHERE state = 'pending')"
            ).fetchone() == (True,):
                if time.perf_counter() - start > 600 or relay.poll() is not None:
                    raise RuntimeError("the relay process did not drain the backlog")
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            cpu = process_cpu(relay.pid) - cpu_start
    finally:
        relay.terminate()
        relay.wait(30)
    arrived = _queue_depth(ctx)
    if arrived < expected:
        raise RuntimeError(f"{arrived} of {expected} events reached the queue")
    return expected / elapsed, cpu, use


def _queue_depth(ctx: Context) -> int:
    with amqp_channel(ctx.amqp_url) as channel:
        return int(channel.queue_declare(ctx.queue, passive=True).message_count)


def figure_drain(ctx: Context, rounds: int = 3) -> list[Figure]:
    """Rounds of (baseline, ``outbox relay`` process) on the same backlog; the median round.

    The baseline is the best sliding window of BASELINE_WINDOWS over the very
    messages the relay sends. The two sides alternate which goes first: each
    leaves the broker writing out and compacting what it just received, which
    slows whatever runs next. The in-process Relay and py-amqp's own publish
    loop are extra rows.
    """
    engine = create_outbox_engine(ctx.database_url, pool_size=4)
    settings = RelaySettings(batch_size=ctx.batch_size)
    measured: list[_DrainRound] = []

    def seed() -> list[OutgoingMessage]:
        _truncate(ctx)
        seed_pending(ctx.database_url, ctx.events)
        return outgoing_messages(SqlStore(engine), settings)

    try:
        for round_ in range(rounds):
            messages = seed()
            plain = plain_amqp_rate(ctx, messages)
            purge(ctx)
            baseline_first = round_ % 2 == 0
            if baseline_first:
                with measure_cpu() as raw_cpu:
                    raw, window = best_window_rate(ctx, messages)
            rate, relay_seconds, relay_cpu = relay_process_drain_rate(ctx)
            purge(ctx)
            if not baseline_first:
                with measure_cpu() as raw_cpu:
                    raw, window = best_window_rate(ctx, messages)
            seed()
            in_process = drain_rate(ctx, engine)
            purge(ctx)
            measured.append(
                _DrainRound(rate, raw, window, plain, in_process, relay_cpu, relay_seconds, raw_cpu)
            )
            print(
                f"drain round {round_ + 1}: relay process {rate / raw:.2f}x, "
                f"in-process {in_process / raw:.2f}x (baseline window {window})",
                file=sys.stderr,
                flush=True,
            )
    finally:
        engine.dispose()
    median = sorted(measured, key=lambda m: m.rate / m.raw)[len(measured) // 2]
    n = f"{ctx.events:,}"
    per_event = 1e6 / ctx.events
    # The baseline measured BASELINE_WINDOWS in turn: its CPU is per event of each.
    raw_runs = ctx.events * len(BASELINE_WINDOWS)
    relay_us = median.relay_cpu.per_event_us(ctx.events)
    raw_us = median.raw_cpu.per_event_us(raw_runs)
    cpu_rows = [
        Figure(
            name=f"  CPU per event, {group} (us)",
            value=relay_us[group],
            unit="us",
            baseline=raw_us[group],
            baseline_name="baseline, same round",
        )
        for group in GROUPS
        if group != "this process" and (relay_us[group] or raw_us[group])
    ]
    cpu_rows.append(
        Figure(
            name="  CPU per event, relay process vs baseline publisher (us)",
            value=median.relay_seconds * per_event,
            unit="us",
            baseline=raw_us["this process"],
            baseline_name="baseline, same round",
        )
    )
    return [
        Figure(
            name=f"drain {n} x 1 KiB events, `outbox relay` process (events/s), median of {rounds}",
            value=median.rate,
            unit="/s",
            baseline=median.raw,
            baseline_name=f"sliding window, best of {'/'.join(map(str, BASELINE_WINDOWS))} "
            f"(here {median.window}), same messages, no database",
            target=">= 0.90",
        ),
        Figure(
            name="  (extra) in-process Relay.drain (events/s)",
            value=median.in_process,
            unit="/s",
            baseline=median.raw,
            baseline_name="same round's baseline",
        ),
        Figure(
            name="  (reference) py-amqp basic_publish loop, confirms per batch (msg/s)",
            value=median.plain,
            unit="/s",
            baseline=median.raw,
            baseline_name="same round's baseline",
        ),
        *cpu_rows,
    ]


def figure_hot_key(ctx: Context, events: int = 5_000, rounds: int = 3) -> list[Figure]:
    """The price of one unconfirmed message per key: one key's backlog against 1,000 keys'.

    Median of alternating rounds, the same number of events each side.
    """
    engine = create_outbox_engine(ctx.database_url, pool_size=4)
    pairs: list[tuple[float, float]] = []
    try:
        for round_ in range(rounds):
            sides: dict[int, float] = {}
            for key_count in (1, KEYS) if round_ % 2 == 0 else (KEYS, 1):
                _truncate(ctx)
                seed_pending(ctx.database_url, events, key_count=key_count)
                sides[key_count] = drain_rate(ctx, engine, events)
                purge(ctx)
            pairs.append((sides[1], sides[KEYS]))
    finally:
        engine.dispose()
    hot, spread = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]
    return [
        Figure(
            name=f"drain {events:,} events of one key (events/s), median of {rounds}",
            value=hot,
            unit="/s",
            baseline=spread,
            baseline_name=f"the same number over {KEYS:,} keys",
            target="cost of per-key order",
        )
    ]


@dataclass(frozen=True)
class _DrainRound:
    rate: float
    raw: float
    window: int
    plain: float
    in_process: float
    relay_cpu: CpuUse
    relay_seconds: float
    raw_cpu: CpuUse


# -- figure 2: producer -----------------------------------------------------


def _envelope(i: int) -> outbox.Envelope:
    return outbox.Envelope(
        action=outbox.Action.UPDATE,
        schema=SCHEMA,
        content={"tenantId": 1, "id": i % KEYS, "version": i, "text": "x" * 200},
    )


def figure_producer(ctx: Context, rounds: int = 21, per_txn: int = 500) -> list[Figure]:
    """Alternating rounds of both; the medians (the first round of each warms caches)."""
    engine = create_outbox_engine(ctx.database_url)
    try:
        ours: list[float] = []
        plain: list[float] = []
        insert = (
            "INSERT INTO outbox_event (event_id, ordering_key, partition, routing_key,"
            " resource_type, payload, headers) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        )
        with psycopg.connect(libpq(ctx.database_url)) as conn:
            for r in range(rounds):
                start = time.perf_counter()
                with Session(engine) as session, session.begin():
                    for i in range(per_txn):
                        outbox.publish(session, _envelope(r * per_txn + i))
                ours.append(per_txn / (time.perf_counter() - start))
                # The same rows (prepared outside the clock), one executemany.
                rows = [prepare_row(_envelope(r * per_txn + i)) for i in range(per_txn)]
                params = [
                    (
                        row["event_id"],
                        row["ordering_key"],
                        ordering.partition_of(row["ordering_key"], 16),
                        row["routing_key"],
                        row["resource_type"],
                        row["payload"],
                        None,
                    )
                    for row in rows
                ]
                start = time.perf_counter()
                with conn.transaction(), conn.cursor() as cursor:
                    cursor.executemany(insert, params)
                plain.append(per_txn / (time.perf_counter() - start))
    finally:
        engine.dispose()
    ours, plain = ours[1:], plain[1:]
    return [
        Figure(
            name=f"producer: publish {per_txn} events in 1 transaction (events/s)",
            value=statistics.median(ours),
            unit="/s",
            baseline=statistics.median(plain),
            baseline_name="psycopg executemany of the same rows",
            target=">= 0.50",
        )
    ]


# -- figure 3: NOTIFY cost ----------------------------------------------------


def _writer(url: str, notify: bool, seconds: float, barrier: Any, out: Any) -> None:
    engine = create_outbox_engine(url, pool_size=1)
    options = ProducerOptions(notify=notify)
    i = os.getpid() * 1_000_000

    def one() -> None:
        nonlocal i
        with Session(engine) as session, session.begin():
            outbox.configure(session, options)
            outbox.publish(session, _envelope(i))
        i += 1

    one()  # connected and warm before the clock starts
    barrier.wait()
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        one()
        count += 1
    engine.dispose()
    out.put(count)


def producer_throughput(ctx: Context, *, notify: bool, writers: int, seconds: float) -> float:
    """Transactions per second of ``writers`` processes, one event per transaction."""
    mp = multiprocessing.get_context("spawn")
    queue = mp.Queue()
    barrier = mp.Barrier(writers + 1)
    procs = [
        mp.Process(target=_writer, args=(ctx.database_url, notify, seconds, barrier, queue))
        for _ in range(writers)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)  # every writer imported, connected and warm
    total: int = sum(queue.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def figure_notify(
    ctx: Context, writers: int = 8, seconds: float = 3.0, rounds: int = 5
) -> list[Figure]:
    """Rounds of NOTIFY off and on, alternating which goes first; the median ratio."""
    pairs: list[tuple[float, float]] = []  # on, off
    for round_ in range(rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        rates = {
            notify: producer_throughput(ctx, notify=notify, writers=writers, seconds=seconds)
            for notify in order
        }
        pairs.append((rates[True], rates[False]))
    on, off = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]
    return [
        Figure(
            name=f"producer, {writers} writers, 1 event/txn, NOTIFY on (txn/s), median of {rounds}",
            value=on,
            unit="/s",
            baseline=off,
            baseline_name="same with NOTIFY off, same round",
            target="(cost of NOTIFY)",
        )
    ]


# -- figure 4: end-to-end latency ---------------------------------------------


def _consumer(amqp_url: str, queue: str, expected: int, ready: Any, out: Any) -> None:
    connection = _plain_connection(amqp_url)
    connection.connect()
    channel = connection.channel()
    received: dict[str, float] = {}

    def on_message(message: Any) -> None:
        received.setdefault(message.properties["message_id"], time.time())

    channel.basic_consume(queue, callback=on_message, no_ack=True)
    ready.set()
    deadline = time.monotonic() + 120
    while len(received) < expected and time.monotonic() < deadline:
        try:
            connection.drain_events(timeout=1)
        except TimeoutError:
            continue
    connection.close()
    out.put(received)


def _relay_process(ctx: Context, trace_file: str | None = None) -> subprocess.Popen[bytes]:
    """``outbox relay`` with default settings; with ``trace_file``, its traced twin."""
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": ctx.database_url,
        "OUTBOX_BROKER_URL": ctx.amqp_url,
        "OUTBOX_EXCHANGE": ctx.exchange,
        "OUTBOX_LOG_LEVEL": "WARNING",
        "OUTBOX_LOG_FORMAT": "json",
    }
    command = [sys.executable, "-m", "outbox.cli", "relay"]
    if trace_file is not None:
        env["BENCH_TRACE_FILE"] = trace_file
        command = [sys.executable, "-m", "benchmarks.traced_relay"]
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_owner(
    ctx: Context,
    timeout: float = 30.0,
    *,
    poll: float = 0.05,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Until a relay holds a partition; fails early if ``process`` (the relay) exited."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(libpq(ctx.database_url), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM outbox_partition WHERE owner IS NOT NULL"
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            if process is not None and process.poll() is not None:
                break
            time.sleep(poll)
    raise RuntimeError("the relay did not take its partitions")


def _steady_producer(
    url: str, rate: float, total: int, first: int, start_at: float, out: Any
) -> None:
    """Commit ``total`` events, one per transaction, at ``rate`` per second from ``start_at``.

    Puts (event id -> commit time, seconds spent sending) on ``out``.
    """
    engine = create_outbox_engine(url, pool_size=1)
    with Session(engine) as session, session.begin():  # connected and warm
        outbox.publish(session, _envelope(first), key=f"warmup-{first}")
    committed: dict[str, float] = {}
    interval = 1.0 / rate
    next_at = start_at
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    began = time.perf_counter()
    for i in range(total):
        now = time.time()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        with Session(engine) as session:
            with session.begin():
                event_id = outbox.publish(session, _envelope(first + i))
            committed[str(event_id)] = time.time()
    out.put((committed, time.perf_counter() - began))
    engine.dispose()


def figure_latency(
    ctx: Context, rate: float = 500.0, seconds: float = 10.0, *, trace: bool = False
) -> list[Figure]:
    """Producer processes at a steady ``rate`` in all (one per 500/s), a consumer process,
    and a real ``outbox relay`` process between them.

    With ``trace``, the relay runs traced (benchmarks.traced_relay) and the
    attribution of the slowest events is printed (benchmarks.attribution).
    """
    producers = max(1, round(rate / 500))
    per_producer = int(rate * seconds) // producers
    total = per_producer * producers
    mp = multiprocessing.get_context("spawn")
    ready, out, done = mp.Event(), mp.Queue(), mp.Queue()
    expected = total + producers  # and the warm-up events
    consumer = mp.Process(target=_consumer, args=(ctx.amqp_url, ctx.queue, expected, ready, out))
    consumer.start()
    trace_file = None
    if trace:
        trace_file = os.path.join(tempfile.mkdtemp(prefix="outbox-trace-"), "trace.json")
    relay = _relay_process(ctx, trace_file)
    committed: dict[str, float] = {}
    workers: list[Any] = []
    try:
        ready.wait(30)
        _wait_for_owner(ctx)
        start_at = time.time() + 3.0  # every producer imported and warm by then
        workers = [
            mp.Process(
                target=_steady_producer,
                args=(
                    ctx.database_url,
                    rate / producers,
                    per_producer,
                    n * 1_000_000,
                    start_at,
                    done,
                ),
            )
            for n in range(producers)
        ]
        for worker in workers:
            worker.start()
        spent = 0.0
        for _ in workers:
            part, seconds_spent = done.get(timeout=seconds * 4 + 120)
            committed.update(part)
            spent = max(spent, seconds_spent)
        received: dict[str, float] = out.get(timeout=120)
    finally:
        relay.terminate()
        relay.wait(30)
        consumer.join(30)
        for worker in workers:
            worker.join(30)
    latencies = sorted((received[k] - t) * 1000 for k, t in committed.items() if k in received)
    if len(latencies) < total:
        raise RuntimeError(f"only {len(latencies)} of {total} events arrived")
    achieved = total / spent
    print(
        f"latency at {rate:.0f}/s: {producers} producer(s) sent at {achieved:.0f}/s",
        file=sys.stderr,
        flush=True,
    )
    if trace_file is not None:
        with open(trace_file) as timeline:
            print(attribution.report(json.load(timeline), committed, received), file=sys.stderr)
    marks = {
        "p50": (0.50, 2.0),
        "p99": (0.99, 5.0),
        "p99.9": (0.999, None),
        "max": (1.0, None),
    }
    figures = []
    for label, (quantile, target) in marks.items():
        value = latencies[min(len(latencies) - 1, int(len(latencies) * quantile))]
        figures.append(
            Figure(
                name=f"latency commit -> consumer at {rate:,.0f}/s, {label} (ms)",
                value=value,
                unit="ms",
                baseline=target,
                baseline_name="target" if target else "",
                target="<= 1.00" if target else "",
            )
        )
    return figures


# -- figure 5: drain with a million delivered rows ----------------------------


def figure_history(ctx: Context, history: int) -> list[Figure]:
    """Drain on an empty table, with ``history`` delivered rows, then empty again.

    The baseline is the mean of the two empty-table drains, so that a drift of
    the machine's load during the run does not favour either side.
    """
    engine = create_outbox_engine(ctx.database_url, pool_size=4)

    def drain_with(delivered: int) -> float:
        _truncate(ctx)
        if delivered:
            seed_pending(ctx.database_url, delivered, state="delivered")
        seed_pending(ctx.database_url, ctx.events)
        rate = drain_rate(ctx, engine)
        purge(ctx)
        return rate

    try:
        before = drain_with(0)
        full = drain_with(history)
        after = drain_with(0)
    finally:
        engine.dispose()
    return [
        Figure(
            name=f"drain with {history:,} delivered rows in the table (events/s)",
            value=full,
            unit="/s",
            baseline=(before + after) / 2,
            baseline_name="the same drain on an empty table, before and after",
            target=">= 0.90",
        )
    ]


def figure_validation(pg_admin_url: str, amqp_url: str, events: int) -> list[Figure]:
    """Relay drain with content validation against a registered schema, on vs off."""
    from benchmarks.validation import measure

    result = measure(pg_admin_url, amqp_url, events=events)
    return [
        Figure(
            name=f"drain {events:,} events, content validation on (events/s)",
            value=result.on_per_second,
            unit="/s",
            baseline=result.off_per_second,
            baseline_name="the same drain with validation off, best of 3 each",
            target="(cost of validation)",
        )
    ]


# -- output -------------------------------------------------------------------


def render(figures: Sequence[Figure]) -> str:
    header = ("figure", "value", "baseline", "ratio", "target", "baseline is")
    rows = [header]
    for f in figures:
        value = f"{f.value:,.2f}" if f.unit == "ms" else f"{f.value:,.0f}"
        base = (
            ""
            if f.baseline is None
            else (f"{f.baseline:,.2f}" if f.unit == "ms" else f"{f.baseline:,.0f}")
        )
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        rows.append((f.name, value, base, ratio, f.target, f.baseline_name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        cells = [
            r[i].ljust(widths[i]) if i in (0, 4, 5) else r[i].rjust(widths[i])
            for i in range(len(r))
        ]
        lines.append(" | ".join(cells).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="backlog size to drain")
    parser.add_argument("--history", type=int, default=1_000_000, help="delivered rows")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="drain rounds (median reported)")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="latency: run the relay traced and print where the slowest events waited",
    )
    parser.add_argument(
        "--latency-rates", default="500,2000", help="comma-separated event rates for latency"
    )
    parser.add_argument(
        "--only",
        default="drain,hotkey,producer,notify,latency,history,validation",
        help="comma-separated figures to run "
        "(drain,hotkey,producer,notify,latency,history,validation)",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    figures: list[Figure] = []
    with fresh_database(args.pg_admin_url) as url, fresh_queue(args.amqp_url) as (ex, q):
        ctx = Context(
            admin_url=args.pg_admin_url,
            database_url=url,
            amqp_url=args.amqp_url,
            exchange=ex,
            queue=q,
            events=args.events,
            batch_size=args.batch_size,
        )
        print(f"database {redact(url)}, exchange {ex}", file=sys.stderr)
        # Latency first: the target is for a steady load on a quiet machine,
        # and the other figures leave PostgreSQL and RabbitMQ writing out and
        # compacting for a while after they finish.
        if "latency" in only:
            for rate in (float(r) for r in args.latency_rates.split(",")):
                purge(ctx)
                figures += figure_latency(ctx, rate, trace=args.trace)
                _progress(figures)
        if "drain" in only:
            figures += figure_drain(ctx, args.rounds)
            _progress(figures)
        if "hotkey" in only:
            figures += figure_hot_key(ctx)
            _progress(figures)
        if "producer" in only:
            figures += figure_producer(ctx)
            _progress(figures)
        if "notify" in only:
            figures += figure_notify(ctx)
            _progress(figures)
        if "history" in only:
            figures += figure_history(ctx, args.history)
            _progress(figures)
    if "validation" in only:
        figures += figure_validation(args.pg_admin_url, args.amqp_url, min(args.events, 20_000))
    print(render(figures))
    return 0


def _truncate(ctx: Context) -> None:
    with psycopg.connect(libpq(ctx.database_url), autocommit=True) as conn:
        conn.execute("TRUNCATE outbox_event")
        conn.execute("UPDATE outbox_partition SET owner = NULL, lease_expires_at = NULL")
        conn.execute("DELETE FROM outbox_relay")
        conn.execute("VACUUM ANALYZE outbox_event")


def _progress(figures: Sequence[Figure]) -> None:
    print(render(figures), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
