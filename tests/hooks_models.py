"""Models and helpers shared by the session-hook tests (no tests here)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    Numeric,
    String,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import outbox
from outbox.store import table

CASE_SCHEMA = "https://example.org/schemas/case.json"
TASK_SCHEMA = "https://example.org/schemas/task.json"
TICKET_SCHEMA = "https://example.org/schemas/ticket.json"
DOCUMENT_SCHEMA = "https://example.org/schemas/document.json"


class Base(DeclarativeBase):
    pass


@outbox.resource(schema=CASE_SCHEMA)
class Case(Base):
    """Versioned by SQLAlchemy (version_id_col); contains notes, which contain attachments."""

    __tablename__ = "hk_case"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    title: Mapped[str] = mapped_column(String(200))
    opened_on: Mapped[dt.date | None] = mapped_column(default=None)
    amount: Mapped[decimal.Decimal | None] = mapped_column(Numeric(12, 2), default=None)
    notes: Mapped[list[CaseNote]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="CaseNote.id"
    )
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


@outbox.child_of("case")
class CaseNote(Base):
    __tablename__ = "hk_case_note"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(String(200))
    case: Mapped[Case] = relationship(back_populates="notes")
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="note", cascade="all, delete-orphan"
    )
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "case_id"], ["hk_case.tenant_id", "hk_case.id"]),
    )


@outbox.child_of("note")
class Attachment(Base):
    __tablename__ = "hk_attachment"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    note_id: Mapped[int] = mapped_column(ForeignKey("hk_case_note.id"))
    name: Mapped[str] = mapped_column(String(200))
    note: Mapped[CaseNote] = relationship(back_populates="attachments")


@outbox.resource(
    schema=TASK_SCHEMA,
    actions={"create", "delete"},
    content={"create": "reference"},
    version="revision",
)
class Task(Base):
    """A plain version attribute, incremented by the hooks; publishes no updates."""

    __tablename__ = "hk_task"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int | None] = mapped_column(Integer, default=None)
    title: Mapped[str] = mapped_column(String(200))


def ticket_content(ticket: Ticket) -> dict[str, Any]:
    return {"tenantId": ticket.tenant, "id": ticket.number, "subject": ticket.subject}


def require_subject(schema: str, content: Mapping[str, Any]) -> None:
    if not content.get("subject"):
        raise ValueError(f"{schema}: subject must not be empty")


@outbox.resource(
    schema=TICKET_SCHEMA,
    serializer=ticket_content,
    validator=require_subject,
    tenant_id="tenant",
    id="number",
    content={"delete": "full"},
)
class Ticket(Base):
    """Custom serializer, validator and attribute names; no version column."""

    __tablename__ = "hk_ticket"
    tenant: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str] = mapped_column(String(200))


@outbox.resource(schema=DOCUMENT_SCHEMA, content={"delete": "full"})
class Document(Base):
    """Its default content holds bytes, which have no lossless JSON form."""

    __tablename__ = "hk_document"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)


class Comment(Base):
    """Not published."""

    __tablename__ = "hk_comment"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def events(engine: Engine) -> list[dict[str, Any]]:
    """Every outbox row, in position order, as the parts tests look at."""
    with engine.connect() as connection:
        rows = connection.execute(select(table.event).order_by(table.event.c.position)).all()
    out = []
    for row in rows:
        payload = json.loads(row.payload)
        out.append(
            {
                "action": payload["action"],
                "schema": payload["resource"]["schema"],
                "content": payload["resource"]["content"],
                "routing_key": row.routing_key,
                "ordering_key": row.ordering_key,
                "headers": row.headers or {},
            }
        )
    return out


def summary(engine: Engine) -> list[tuple[str, str]]:
    """``[(routing key, ordering key), ...]`` in position order."""
    return [(e["routing_key"], e["ordering_key"]) for e in events(engine)]
