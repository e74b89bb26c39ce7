"""Example producer: a service that writes Case resources; the session hooks add the events.

It creates, updates and now and then deletes a ``Case`` in its own
transactions. It never talks to the broker: ``outbox.instrument`` makes every
committed change of a ``@outbox.resource`` class write its event row in the
same transaction, and the relay forwards the rows.

    OUTBOX_DATABASE_URL=postgresql://... python producer.py [--count N] [--interval S]

The database URL is read like the relay reads it (variable, ``_FILE``, or
``OUTBOX_SECRETS_DIR``). The outbox tables must exist (``outbox migrate``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import time

from sqlalchemy import Engine, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import outbox
from outbox.cli import settings
from outbox.store.engine import create_outbox_engine, redact

SCHEMA = "https://example.org/schemas/case.json"
STATUSES = ("open", "in progress", "waiting", "closed")

log = logging.getLogger("example.producer")


class Base(DeclarativeBase):
    pass


@outbox.resource(schema=SCHEMA, version="version")
class Case(Base):
    __tablename__ = "example_case"

    tenant_id: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int]
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))


def run(engine: Engine, *, count: int, interval: float, tenant_id: int = 1) -> int:
    """Make ``count`` changes (0: forever), one transaction each; return how many."""
    Base.metadata.create_all(engine)  # the service's own table; outbox tables come from migrate
    Session = outbox.instrument(sessionmaker(engine))
    rng = random.Random()
    with Session() as session:
        next_id = (session.scalar(select(Case.id).order_by(Case.id.desc()).limit(1)) or 0) + 1
    changes = 0
    for step in itertools.count():
        if count and changes >= count:
            break
        with Session() as session, session.begin():
            open_cases = session.scalars(
                select(Case).where(Case.tenant_id == tenant_id, Case.status != "closed").limit(20)
            ).all()
            if not open_cases or step % 3 == 0:
                case = Case(tenant_id=tenant_id, id=next_id, title=f"Case {next_id}", status="open")
                session.add(case)
                next_id += 1
                what = f"created case {case.id}"
            else:
                case = rng.choice(open_cases)
                case.status = STATUSES[STATUSES.index(case.status) + 1]
                what = f"case {case.id} is now {case.status}"
                if case.status == "closed" and rng.random() < 0.5:
                    session.delete(case)
                    what = f"deleted case {case.id}"
        changes += 1
        log.info("%s", what)
        if interval:
            time.sleep(interval)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=0, help="changes to make (0: forever)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between changes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s producer %(message)s")
    url = settings.resolve({}, "producer")["database_url"]
    if not url:
        raise SystemExit("set OUTBOX_DATABASE_URL (or OUTBOX_DATABASE_URL_FILE)")
    log.info("writing cases to %s", redact(url))
    engine = create_outbox_engine(url)
    try:
        run(engine, count=args.count, interval=args.interval)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
