"""Session hooks turn ORM changes into events, on PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, Integer, delete, event, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox.errors import BulkChangeError, ResourceContentError
from outbox.schemas.registry import SchemaRegistry
from outbox.store.engine import create_outbox_engine
from tests.conftest import create_database, drop_database, pg_url
from tests.hooks_models import (
    CASE_SCHEMA,
    Attachment,
    Base,
    Case,
    CaseNote,
    Comment,
    Document,
    Task,
    Ticket,
    events,
    summary,
)


@pytest.fixture(scope="module")
def shared_pg_engine(pg_template: str) -> Iterator[Engine]:
    """One database for the module, emptied before each test (cloning one per test is slow)."""
    name = create_database(pg_template)
    engine = create_outbox_engine(pg_url(name))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()
    drop_database(name)


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "postgresql":
        engine: Engine = request.getfixturevalue("shared_pg_engine")
        names = ", ".join([*(t.name for t in Base.metadata.sorted_tables), "outbox_event"])
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
    else:
        engine = request.getfixturevalue("sqlite_engine")
        Base.metadata.create_all(engine)
    yield engine


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return outbox.instrument(sessionmaker(engine))


@pytest.fixture
def lite(sqlite_engine: Engine) -> Engine:
    """SQLite only, for behaviour that does not depend on the database."""
    Base.metadata.create_all(sqlite_engine)
    return sqlite_engine


@pytest.fixture
def lite_factory(lite: Engine) -> sessionmaker[Session]:
    return outbox.instrument(sessionmaker(lite))


def add_case(factory: sessionmaker[Session], case_id: int = 1, *notes: str) -> None:
    """A case (and notes) committed through a plain, uninstrumented factory: no events."""
    with sessionmaker(factory.kw["bind"]).begin() as session:
        session.add(
            Case(
                tenant_id=1,
                id=case_id,
                title=f"Case {case_id}",
                notes=[CaseNote(text=t) for t in notes],
            )
        )


def db_version(factory: sessionmaker[Session], case_id: int = 1) -> int:
    with sessionmaker(factory.kw["bind"])() as session:
        return session.get_one(Case, (1, case_id)).version


# --- create, update, delete ------------------------------------------------------


def test_create_writes_one_event_with_the_full_content(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as session:
        session.begin()
        session.add(
            Case(
                tenant_id=1,
                id=7,
                title="New",
                opened_on=dt.date(2026, 11, 26),
                amount=decimal.Decimal("12.50"),
            )
        )
        session.flush()
        assert events(engine) == []  # nothing is visible before the commit
        session.commit()

    (event,) = events(engine)
    assert event["action"] == "create"
    assert event["schema"] == CASE_SCHEMA
    assert event["content"] == {
        "tenantId": 1,
        "id": 7,
        "version": 1,
        "title": "New",
        "openedOn": "2026-11-26",
        "amount": "12.50",
    }
    assert event["routing_key"] == "case.create"
    assert event["ordering_key"] == "case:1:7"
    assert event["headers"] == {"outbox-resource-version": "1"}


def test_update_carries_the_content_after_the_change(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        session.get_one(Case, (1, 1)).title = "Renamed"

    (event,) = events(engine)
    assert event["action"] == "update"
    assert event["content"]["title"] == "Renamed"
    assert event["content"]["version"] == 2 == db_version(factory)
    assert event["headers"] == {"outbox-resource-version": "2"}


def test_delete_carries_a_reference_by_default(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        session.delete(session.get_one(Case, (1, 1)))

    (event,) = events(engine)
    assert event["action"] == "delete"
    assert event["content"] == {"tenantId": 1, "id": 1, "version": 1}
    assert event["routing_key"] == "case.delete"
    assert event["headers"] == {"outbox-resource-version": "1"}


def test_a_change_that_sets_the_same_value_publishes_nothing(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        case = session.get_one(Case, (1, 1))
        case.title = case.title
        session.add(Comment(id=1, text="unpublished class"))

    assert events(engine) == []


def test_rollback_writes_nothing(engine: Engine, factory: sessionmaker[Session]) -> None:
    add_case(factory)
    with factory() as session:
        session.begin()
        session.add(Case(tenant_id=1, id=2, title="Never"))
        session.get_one(Case, (1, 1)).title = "Never"
        session.flush()
        session.rollback()

    assert events(engine) == []
    assert db_version(factory) == 1


def test_rolled_back_savepoint_discards_exactly_its_changes(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1)
    add_case(factory, 2)
    add_case(factory, 3)
    with factory.begin() as session:
        session.get_one(Case, (1, 1)).title = "Kept"
        savepoint = session.begin_nested()
        session.get_one(Case, (1, 2)).title = "Dropped"
        session.add(Case(tenant_id=1, id=4, title="Dropped"))
        session.get_one(Case, (1, 1)).notes.append(CaseNote(text="dropped"))
        savepoint.rollback()
        with session.begin_nested():  # a released SAVEPOINT keeps its changes
            session.get_one(Case, (1, 3)).title = "Kept too"

    assert summary(engine) == [("case.update", "case:1:1"), ("case.update", "case:1:3")]
    (first, second) = events(engine)
    assert first["content"]["title"] == "Kept"
    assert first["content"]["version"] == 2  # the version bump inside the SAVEPOINT was undone
    assert second["content"]["title"] == "Kept too"


# --- net effect per transaction ------------------------------------------------------


def test_created_then_updated_is_one_create_with_the_final_state(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    with factory.begin() as session:
        case = Case(tenant_id=1, id=1, title="Draft")
        session.add(case)
        session.flush()
        case.title = "Final"
        session.flush()
        case.notes.append(CaseNote(text="note"))

    (event,) = events(engine)
    assert event["action"] == "create"
    assert event["content"]["title"] == "Final"
    assert event["content"]["version"] == db_version(factory)


def test_many_updates_in_several_flushes_are_one_update(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        case = session.get_one(Case, (1, 1))
        for n in range(3):
            case.title = f"Title {n}"
            session.flush()
        case.notes.append(CaseNote(text="note"))

    (event,) = events(engine)
    assert event["action"] == "update"
    assert event["content"]["title"] == "Title 2"
    assert event["content"]["version"] == db_version(factory) == 5


def test_updated_then_deleted_is_one_delete(engine: Engine, factory: sessionmaker[Session]) -> None:
    add_case(factory)
    with factory.begin() as session:
        case = session.get_one(Case, (1, 1))
        case.title = "Changed"
        session.flush()
        session.delete(case)

    (event,) = events(engine)
    assert event["action"] == "delete"
    assert event["content"] == {"tenantId": 1, "id": 1, "version": 2}


def test_created_then_deleted_is_nothing(engine: Engine, factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        case = Case(tenant_id=1, id=1, title="Short-lived", notes=[CaseNote(text="n")])
        session.add(case)
        session.flush()
        session.delete(case)

    assert events(engine) == []


def test_deleted_and_recreated_is_one_update(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        session.delete(session.get_one(Case, (1, 1)))
        session.flush()
        session.add(Case(tenant_id=1, id=1, title="Reborn"))

    (event,) = events(engine)
    assert (event["action"], event["content"]["title"]) == ("update", "Reborn")


# --- children ------------------------------------------------------------------------


def test_adding_a_child_is_an_update_of_the_parent_with_a_new_version(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        session.add(CaseNote(case=session.get_one(Case, (1, 1)), text="first"))

    (event,) = events(engine)
    assert (event["action"], event["ordering_key"]) == ("update", "case:1:1")
    assert event["content"]["version"] == 2 == db_version(factory)
    assert event["headers"] == {"outbox-resource-version": "2"}


def test_many_child_changes_are_one_update_per_parent(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1, "a", "b", "c")
    add_case(factory, 2, "x")
    with factory.begin() as session:
        case = session.get_one(Case, (1, 1))
        case.notes[0].text = "a2"
        session.flush()
        case.notes.append(CaseNote(text="d"))
        session.delete(case.notes[1])
        session.flush()
        session.get_one(Case, (1, 2)).notes[0].text = "x2"

    assert sorted(summary(engine)) == [("case.update", "case:1:1"), ("case.update", "case:1:2")]
    # Each flush that changed a child bumped the version (autoflush included);
    # the event carries the final one.
    assert db_version(factory, 1) >= 3
    versions = {e["content"]["id"]: e["content"]["version"] for e in events(engine)}
    assert versions == {1: db_version(factory, 1), 2: 2}


def test_deleting_a_child_whose_parent_was_never_loaded_finds_the_parent(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1, "doomed")
    with factory.begin() as session:
        note = session.scalars(select(CaseNote)).one()
        assert "case" not in note.__dict__  # the relationship is not loaded yet
        session.delete(note)

    (event,) = events(engine)
    assert (event["action"], event["ordering_key"]) == ("update", "case:1:1")
    assert event["content"]["version"] == 2


def test_removing_an_orphan_child_from_the_collection_is_an_update(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1, "a", "b")
    with factory.begin() as session:
        case = session.get_one(Case, (1, 1))
        case.notes.remove(case.notes[0])

    (event,) = events(engine)
    assert event["action"] == "update"
    with factory() as session:
        assert [n.text for n in session.get_one(Case, (1, 1)).notes] == ["b"]


def test_grandchildren_update_the_top_resource(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1, "note")
    with factory.begin() as session:
        note = session.scalars(select(CaseNote)).one()
        session.add(Attachment(note=note, name="scan.pdf"))
    with factory.begin() as session:
        attachment = session.scalars(select(Attachment)).one()
        attachment.name = "scan-2.pdf"
    with factory.begin() as session:
        session.delete(session.scalars(select(Attachment)).one())

    assert summary(engine) == [("case.update", "case:1:1")] * 3
    assert [e["content"]["version"] for e in events(engine)] == [2, 3, 4]


def test_moving_a_child_updates_both_parents(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1, "moving")
    add_case(factory, 2)
    with factory.begin() as session:
        note = session.scalars(select(CaseNote)).one()
        note.case = session.get_one(Case, (1, 2))

    assert sorted(summary(engine)) == [("case.update", "case:1:1"), ("case.update", "case:1:2")]


def test_a_child_linked_by_its_foreign_key_alone_updates_its_parent(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1)
    add_case(factory, 2)
    with factory.begin() as session:
        session.add(CaseNote(tenant_id=1, case_id=1, text="by key"))
    with factory.begin() as session:
        session.scalars(select(CaseNote)).one().case_id = 2  # moved by key, both change

    first, *second = summary(engine)
    assert first == ("case.update", "case:1:1")
    assert sorted(second) == [("case.update", "case:1:1"), ("case.update", "case:1:2")]


def test_deleting_a_parent_with_children_is_one_delete(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory, 1, "a", "b")
    with factory.begin() as session:
        session.delete(session.get_one(Case, (1, 1)))

    assert summary(engine) == [("case.delete", "case:1:1")]


# --- actions, content modes, serializers -------------------------------------------


def test_actions_and_content_modes_are_chosen_per_resource(
    lite: Engine, lite_factory: sessionmaker[Session]
) -> None:
    with lite_factory.begin() as session:
        session.add(Task(tenant_id=1, id=1, title="t"))
    with lite_factory.begin() as session:
        session.get_one(Task, (1, 1)).title = "t2"  # updates are not published for tasks
    with lite_factory.begin() as session:
        session.delete(session.get_one(Task, (1, 1)))

    assert [(e["action"], e["content"]) for e in events(lite)] == [
        ("create", {"tenantId": 1, "id": 1, "version": 1}),
        ("delete", {"tenantId": 1, "id": 1, "version": 2}),  # the hooks bumped the revision
    ]


def test_custom_serializer_and_attribute_names(
    lite: Engine, lite_factory: sessionmaker[Session]
) -> None:
    with lite_factory.begin() as session:
        session.add(Ticket(tenant=3, number=9, subject="Printer"))
    with lite_factory.begin() as session:
        session.delete(session.get_one(Ticket, (3, 9)))

    assert [(e["action"], e["content"], e["ordering_key"]) for e in events(lite)] == [
        ("create", {"tenantId": 3, "id": 9, "subject": "Printer"}, "ticket:3:9"),
        ("delete", {"tenantId": 3, "id": 9, "subject": "Printer"}, "ticket:3:9"),
    ]
    assert events(lite)[0]["headers"] == {}  # no version attribute, no version header


def test_content_that_fails_validation_raises_before_anything_commits(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as session:
        session.begin()
        session.add(Case(tenant_id=1, id=1, title="Innocent bystander"))
        session.add(Ticket(tenant=3, number=9, subject=""))
        with pytest.raises(
            ResourceContentError, match=r"create event of Ticket\(tenant=3, number=9\)"
        ):
            session.commit()

    assert events(engine) == []
    with factory() as session:
        assert session.scalars(select(Case)).all() == []


def test_a_commit_retried_after_fixing_the_content_publishes_the_net_effect(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as session:
        session.begin()
        ticket = Ticket(tenant=3, number=9, subject="")
        session.add(ticket)
        with pytest.raises(ResourceContentError):
            session.commit()
        ticket.subject = "Fixed"
        session.commit()

    assert [(e["action"], e["content"]["subject"]) for e in events(engine)] == [("create", "Fixed")]


def test_content_that_does_not_serialise_raises_naming_the_resource(
    lite: Engine, lite_factory: sessionmaker[Session]
) -> None:
    with lite_factory() as session, pytest.raises(ResourceContentError) as raised, session.begin():
        session.add(Document(tenant_id=1, id=5, body=b"\x00\x01"))

    message = str(raised.value)
    assert "Document(tenant_id=1, id=5)" in message
    assert "content.body" in message and "bytes" in message
    with lite_factory() as session:
        assert session.scalars(select(Document)).all() == []


def test_content_is_validated_against_the_schema_registry(engine: Engine) -> None:
    registry = SchemaRegistry()
    registry.register(
        CASE_SCHEMA,
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"title": {"type": "string", "maxLength": 10}},
        },
    )
    factory = outbox.instrument(sessionmaker(engine))
    outbox.configure(factory, outbox.ProducerOptions(schemas=registry))
    with (
        factory() as session,
        pytest.raises(ResourceContentError) as raised,
        session.begin(),
    ):
        session.add(Case(tenant_id=1, id=1, title="Far too long a title"))

    assert "create event of Case(tenant_id=1, id=1)" in str(raised.value)
    assert "title" in str(raised.value)
    assert events(engine) == []
    with factory.begin() as session:
        session.add(Case(tenant_id=1, id=1, title="Short"))
    assert summary(engine) == [("case.create", "case:1:1")]


# --- bulk statements -------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        update(Case).values(title="x"),
        delete(Case),
        insert(Case).values(tenant_id=1, id=9, title="x", version=1),
        update(CaseNote).values(text="x"),  # a child: its parent's event would be lost
    ],
    ids=["update", "delete", "insert", "child-update"],
)
def test_bulk_statements_on_published_classes_raise(
    lite: Engine, lite_factory: sessionmaker[Session], statement: object
) -> None:
    add_case(lite_factory, 1, "n")
    with (
        lite_factory() as session,
        pytest.raises(BulkChangeError, match="change them through the session"),
    ):
        session.execute(statement)  # type: ignore[call-overload]
    assert events(lite) == []


def test_legacy_query_update_raises(engine: Engine, factory: sessionmaker[Session]) -> None:
    add_case(factory)
    with factory() as session, pytest.raises(BulkChangeError, match="bulk update of Case"):
        session.query(Case).filter(Case.id == 1).update({"title": "x"})


def test_bulk_statements_pass_with_the_explicit_option_or_on_other_classes(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    add_case(factory)
    with factory.begin() as session:
        session.execute(
            update(Case).values(title="bulk").execution_options(outbox_unpublished=True)
        )
        session.add(Comment(id=1, text="c"))
        session.flush()
        session.execute(update(Comment).values(text="bulk"))
        session.execute(text("UPDATE hk_comment SET text = 'raw'"))  # Core SQL: out of scope

    assert events(engine) == []
    with factory() as session:
        assert session.get_one(Case, (1, 1)).title == "bulk"


# --- factories -------------------------------------------------------------------------


def test_instrument_affects_only_that_factory(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    other = sessionmaker(engine)
    with other.begin() as session:
        session.add(Case(tenant_id=1, id=1, title="plain"))
    with Session(engine) as session, session.begin():
        session.add(Case(tenant_id=1, id=2, title="plain"))
    assert events(engine) == []

    outbox.instrument(factory)  # twice is the same as once
    with factory.begin() as session:
        session.add(Case(tenant_id=1, id=3, title="instrumented"))
    assert summary(engine) == [("case.create", "case:1:3")]


def test_scoped_session_and_session_subclass(engine: Engine) -> None:
    from sqlalchemy.orm import scoped_session

    scoped = outbox.instrument(scoped_session(sessionmaker(engine)))
    scoped.add(Case(tenant_id=1, id=1, title="scoped"))
    scoped.commit()
    scoped.remove()

    class AppSession(Session):
        pass

    outbox.instrument(AppSession)
    with AppSession(engine) as session, session.begin():
        session.add(Case(tenant_id=1, id=2, title="subclass"))

    assert summary(engine) == [("case.create", "case:1:1"), ("case.create", "case:1:2")]


def test_instrument_refuses_the_global_session_class() -> None:
    with pytest.raises(outbox.ConfigurationError, match="every session"):
        outbox.instrument(Session)


def test_publish_and_hooks_share_one_transaction(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    with factory.begin() as session:
        session.add(Case(tenant_id=1, id=1, title="hooked"))
        outbox.publish(
            session,
            outbox.Envelope(action="update", schema=CASE_SCHEMA, content={"tenantId": 1, "id": 99}),
        )

    assert sorted(summary(engine)) == [("case.create", "case:1:1"), ("case.update", "case:1:99")]


def test_changes_made_by_a_later_before_commit_listener_are_published_too(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    def late_change(session: Session) -> None:
        if not session.info.get("late"):
            session.info["late"] = True
            session.add(Case(tenant_id=1, id=2, title="late"))

    with factory() as session:
        session.begin()
        event.listen(session, "before_commit", late_change)  # runs after the hooks' listener
        session.add(Case(tenant_id=1, id=1, title="early"))
        session.commit()

    assert summary(engine) == [("case.create", "case:1:1"), ("case.create", "case:1:2")]


def test_commit_with_a_savepoint_still_open_publishes(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as session:
        root = session.begin()
        session.add(Case(tenant_id=1, id=1, title="outer"))
        session.begin_nested()
        session.add(Case(tenant_id=1, id=2, title="inner"))
        root.commit()

    assert sorted(summary(engine)) == [("case.create", "case:1:1"), ("case.create", "case:1:2")]


# --- configuration errors ------------------------------------------------------------


def test_declaration_mistakes_are_configuration_errors(sqlite_engine: Engine) -> None:
    class Other(DeclarativeBase):
        pass

    with pytest.raises(outbox.ConfigurationError, match="not a mapped class"):
        outbox.resource(schema=CASE_SCHEMA)(type("Plain", (), {}))
    with pytest.raises(outbox.ConfigurationError, match="is not a URI"):
        outbox.resource(schema="not a uri")
    with pytest.raises(outbox.ConfigurationError, match="'full' or 'reference'"):
        outbox.resource(schema=CASE_SCHEMA, content={"delete": "nothing"})  # type: ignore[dict-item]

    @outbox.resource(schema=CASE_SCHEMA)
    class Unversioned(Other):
        __tablename__ = "hk_unversioned"
        tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    @outbox.child_of("owner")  # no such relationship
    class Orphan(Other):
        __tablename__ = "hk_orphan"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    Other.metadata.create_all(sqlite_engine)
    factory = outbox.instrument(sessionmaker(sqlite_engine))
    with factory() as session, pytest.raises(outbox.ConfigurationError, match="need a version"):
        session.add(Unversioned(tenant_id=1, id=1))
        session.commit()
    with factory() as session, pytest.raises(outbox.ConfigurationError, match="'owner'"):
        session.add(Orphan(id=1))
        session.commit()
    assert events(sqlite_engine) == []
