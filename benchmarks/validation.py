"""Relay throughput with content validation on vs off, in one run.

    .venv/bin/python -m benchmarks.validation [--events 20000] [--rounds 3]

Creates a database (dropped afterwards), registers a JSON Schema for the
resource, writes ``--events`` events of about 1 KiB through the producer (so
each row records its schema version), then drains them with ``Relay.drain``
against RabbitMQ, alternating validation off and on; between rounds the rows
are reset to pending and the queue is purged. Prints events/s of the best
round of each and their ratio. ``measure`` is the same as a function (for
``python -m benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kombu
import psycopg
from sqlalchemy import Engine, update

import outbox
from outbox.producer.publish import ProducerOptions, prepare_row, write_rows
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import open_publisher
from outbox.schemas.registry import SchemaRegistry, content_validator
from outbox.store import migrate, table
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore

SCHEMA_URI = "https://example.org/schemas/benchcase"
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["tenantId", "id", "title", "status", "body"],
    "properties": {
        "tenantId": {"type": "integer"},
        "id": {"type": "integer", "minimum": 0},
        "title": {"type": "string", "maxLength": 200},
        "status": {"enum": ["open", "held", "closed"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        "owner": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
        },
        "body": {"type": "string"},
    },
    "additionalProperties": False,
}
KEYS = 1000
PG_ADMIN = os.environ.get("OUTBOX_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("OUTBOX_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


@dataclass(frozen=True)
class ValidationRatio:
    events: int
    content_bytes: int
    off_per_second: float
    on_per_second: float

    @property
    def ratio(self) -> float:
        """Throughput with validation on, as a fraction of throughput with it off."""
        return self.on_per_second / self.off_per_second


def content(i: int, size: int) -> dict[str, Any]:
    base = {
        "tenantId": 1,
        "id": i % KEYS,
        "title": f"Case {i}",
        "status": "open",
        "priority": 3,
        "tags": ["benchmark", "validation"],
        "owner": {"name": "Ada", "email": "ada@example.org"},
        "body": "",
    }
    padding = size - len(json.dumps(base))
    base["body"] = "x" * max(0, padding)
    return base


def seed(engine: Engine, registry: SchemaRegistry, events: int, size: int) -> None:
    options = ProducerOptions(schemas=registry, notify=False)
    chunk = 2000
    for start in range(0, events, chunk):
        rows = [
            prepare_row(
                outbox.Envelope(
                    action=outbox.Action.UPDATE, schema=SCHEMA_URI, content=content(i, size)
                ),
                options=options,
            )
            for i in range(start, min(events, start + chunk))
        ]
        with engine.begin() as connection:
            write_rows(connection, rows, options)


def reset(engine: Engine, url: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(table.event).values(state="pending", delivered_at=None, attempts=0)
        )
    with psycopg.connect(_libpq(url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE outbox_event")


def drain(
    engine: Engine, amqp_url: str, exchange: str, events: int, registry: SchemaRegistry | None
) -> float:
    validator = content_validator(registry) if registry is not None else None
    relay = Relay(
        SqlStore(engine),
        open_publisher(amqp_url, exchange),
        RelaySettings(batch_size=500),
        content_validator=validator,
    )
    started = time.perf_counter()
    published = relay.drain(timeout=600)
    elapsed = time.perf_counter() - started
    if published != events:
        raise RuntimeError(f"drained {published} of {events} events")
    return events / elapsed


def measure(
    pg_admin_url: str = PG_ADMIN,
    amqp_url: str = AMQP,
    *,
    events: int = 20_000,
    content_bytes: int = 1024,
    rounds: int = 3,
) -> ValidationRatio:
    """Best-of-``rounds`` drain rates with validation off and on, alternating."""
    name = f"outbox_bench_validation_{uuid.uuid4().hex[:8]}"
    exchange = f"outbox-bench-validation-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    engine = create_outbox_engine(url)
    queue = kombu.Queue(
        f"{exchange}-all",
        exchange=kombu.Exchange(exchange, type="topic", durable=True),
        routing_key="#",
        durable=False,
        auto_delete=False,
    )
    try:
        migrate.upgrade(engine)
        registry = SchemaRegistry(engine)
        registry.register(SCHEMA_URI, SCHEMA)
        seed(engine, registry, events, content_bytes)
        with kombu.Connection(amqp_url) as connection:
            queue(connection.default_channel).declare()
        rates: dict[bool, list[float]] = {False: [], True: []}
        for round_number in range(rounds * 2):
            validate = round_number % 2 == 1
            if round_number:
                reset(engine, url)
            rates[validate].append(
                drain(engine, amqp_url, exchange, events, registry if validate else None)
            )
            with kombu.Connection(amqp_url) as connection:
                queue(connection.default_channel).purge()
        return ValidationRatio(events, content_bytes, max(rates[False]), max(rates[True]))
    finally:
        engine.dispose()
        with kombu.Connection(amqp_url) as connection:
            channel = connection.default_channel
            queue(channel).delete()
            channel.exchange_delete(exchange)
        with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--content-bytes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default=PG_ADMIN, help="admin URL (creates a database)")
    parser.add_argument("--amqp", default=AMQP)
    args = parser.parse_args(argv)
    result = measure(
        args.pg, args.amqp, events=args.events, content_bytes=args.content_bytes, rounds=args.rounds
    )
    print(
        f"{result.events} events of {result.content_bytes} B content, best of {args.rounds}: "
        f"validation off {result.off_per_second:,.0f} events/s, "
        f"on {result.on_per_second:,.0f} events/s, ratio on/off {result.ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
