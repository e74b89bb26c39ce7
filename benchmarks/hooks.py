"""``python -m benchmarks.hooks``: what the session hooks cost a producer's transaction.

A typical transaction (load one resource, change a field, add a child, commit)
runs alternately from an instrumented ``sessionmaker`` and from a plain one,
on a fresh PostgreSQL database the command creates and drops. It prints the
median of each and their ratio (the instrumented one also writes its event
row: that is the price of the outbox, not only of the hooks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import ForeignKeyConstraint, Integer, String
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from outbox.producer.hooks import child_of, instrument, resource
from outbox.redaction import redact
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class _Base(DeclarativeBase):
    pass


@resource(schema="https://example.org/schemas/bench-case.json")
class BenchCase(_Base):
    __tablename__ = "bench_hooks_case"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="open")
    notes: Mapped[list[BenchNote]] = relationship(back_populates="case")
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


@child_of("case")
class BenchNote(_Base):
    __tablename__ = "bench_hooks_note"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(String(200))
    case: Mapped[BenchCase] = relationship(back_populates="notes")
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "case_id"], ["bench_hooks_case.tenant_id", "bench_hooks_case.id"]
        ),
    )


def typical_transaction(factory: sessionmaker[Session], case_id: int, n: int) -> None:
    with factory.begin() as session:
        case = session.get_one(BenchCase, (1, case_id))
        case.title = f"title {n}"
        session.add(BenchNote(case=case, text=f"note {n}"))


def measure(database_url: str, iterations: int, warmup: int) -> dict[str, Any]:
    engine = create_outbox_engine(database_url)
    try:
        migrate.upgrade(engine)
        _Base.metadata.create_all(engine)
        plain = sessionmaker(engine)
        hooked = instrument(sessionmaker(engine))
        with plain.begin() as session:
            session.add_all([BenchCase(tenant_id=1, id=i, title="start") for i in (1, 2)])
        samples: dict[str, list[float]] = {"plain": [], "instrumented": []}
        for n in range(warmup + iterations):
            # Alternate which one goes first, so that drift hits both alike.
            order = [("plain", plain, 1), ("instrumented", hooked, 2)]
            if n % 2:
                order.reverse()
            for name, factory, case_id in order:
                start = time.perf_counter()
                typical_transaction(factory, case_id, n)
                if n >= warmup:
                    samples[name].append(time.perf_counter() - start)
    finally:
        engine.dispose()
    plain_median = statistics.median(samples["plain"])
    hooked_median = statistics.median(samples["instrumented"])
    return {
        "iterations": iterations,
        "plain_median_ms": round(plain_median * 1000, 3),
        "instrumented_median_ms": round(hooked_median * 1000, 3),
        "ratio": round(hooked_median / plain_median, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hooks", description=__doc__)
    parser.add_argument(
        "--admin-url",
        default=DEFAULT_ADMIN_URL,
        help="PostgreSQL URL of a database from which the benchmark database is created",
    )
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    name = f"outbox_bench_hooks_{uuid.uuid4().hex[:10]}"
    admin_url = args.admin_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        print(f"cannot create a database via {redact(admin_url)}: {exc}", file=sys.stderr)
        return 2
    base, _, _ = admin_url.rpartition("/")
    try:
        result = measure(f"{base}/{name}", args.iterations, args.warmup)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.json:
        print(json.dumps(result))
    else:
        print("typical transaction: load one resource, change a field, add a child, commit")
        print(f"plain factory         median {result['plain_median_ms']:8.3f} ms")
        print(f"instrumented factory  median {result['instrumented_median_ms']:8.3f} ms")
        print(f"ratio                 {result['ratio']:.3f}x  ({result['iterations']} each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
