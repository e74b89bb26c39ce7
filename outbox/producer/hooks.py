"""Session hooks: ORM changes of published resources become events, in the same transaction.

``instrument(factory)`` adds listeners to one session factory. During the
transaction they only *record* which resources were touched (``before_flush``,
where a deleted child still knows its parent). At the root commit they flush,
reduce the record to one net event per resource, build and validate every row,
and hand the rows to the producer's buffer, which locks the ordering keys and
writes them in one INSERT. Because this runs after the final flush, each
resource's own row lock is taken before its key lock.

Net effect of one transaction, per resource (identity), from whether it
existed before the transaction and exists after it: no/no (created, then
deleted) publishes nothing, no/yes a ``create``, yes/no a ``delete``, yes/yes
an ``update``, always with the state at commit.
Any change of a contained child (``@child_of``) counts as an update of the
resource that contains it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any, Final

from sqlalchemy import event, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import (
    InstanceState,
    ORMExecuteState,
    RelationshipProperty,
    Session,
    UOWTransaction,
    attributes,
    scoped_session,
    sessionmaker,
)

from outbox.envelope.model import Action, Envelope, ResourceReference
from outbox.errors import BulkChangeError, ConfigurationError, ResourceContentError, StoreError
from outbox.producer.models import (
    ChildConfig,
    ResourceConfig,
    child_of,
    child_relationship_keys,
    column_content,
    destination,
    is_published,
    resource,
    roles_of,
)
from outbox.producer.publish import (
    ProducerOptions,
    Schemas,
    options_of,
    prepare_row,
    schemas_for,
    write_session_rows,
)
from outbox.producer.savepoints import SavepointLog, log_for, track

__all__ = ["BYPASS_OPTION", "child_of", "column_content", "instrument", "resource"]

_TRACKER_KEY = "outbox.producer.hooks"
_MARKER = "__outbox_hooks__"
BYPASS_OPTION: Final = "outbox_unpublished"
"""Execution option that lets a bulk statement through; its events are then the caller's job."""

INSERT: Final = "insert"
UPDATE: Final = "update"
DELETE: Final = "delete"
CHILD: Final = "child"  # a contained child changed: an update of this resource


_Touch = tuple[Any, str]  # (resource, INSERT | UPDATE | DELETE | CHILD)


class _Tracker(SavepointLog[_Touch]):
    """Resources touched in the session's current transaction (a rolled-back SAVEPOINT
    takes back its touches)."""

    def __init__(self) -> None:
        super().__init__()
        self.sealed = False  # the root commit already turned touches into rows


def _tracker(session: Session) -> _Tracker:
    return log_for(session, _TRACKER_KEY, _Tracker)


# --- recording, at every flush -------------------------------------------------


def _before_flush(session: Session, _context: UOWTransaction, _instances: object) -> None:
    tracker = _tracker(session)
    touched: dict[int, tuple[ResourceConfig, Any, set[str]]] = {}

    def touch(obj: Any, kind: str) -> None:
        config = roles_of(type(obj))[0]
        assert config is not None
        tracker.add((obj, kind))
        touched.setdefault(id(obj), (config, obj, set()))[2].add(kind)

    for obj in session.new:
        res, child = roles_of(type(obj))
        if res is not None:
            touch(obj, INSERT)
        if child is not None:
            for root in _roots(obj, child):
                touch(root, CHILD)
    deleted = session.deleted
    for obj in session.dirty:
        res, child = roles_of(type(obj))
        if res is None and child is None:
            continue
        own = session.is_modified(obj, include_collections=False)
        children = _child_collection_changed(obj)
        if res is not None and own:
            touch(obj, UPDATE)
        if res is not None and children:
            touch(obj, CHILD)
        if child is not None and (own or children):
            for root in _roots(obj, child):
                touch(root, CHILD)
    for obj in deleted:
        res, child = roles_of(type(obj))
        if res is not None:
            touch(obj, DELETE)
        if child is not None:
            for root in _roots(obj, child):
                touch(root, CHILD)
    for config, obj, kinds in touched.values():
        state: InstanceState[Any] = inspect(obj)
        if INSERT in kinds:
            _initial_version(config, obj)
        elif state.has_identity and DELETE not in kinds and obj not in deleted:
            _bump_version(config, obj, state, own_update=UPDATE in kinds)


def _roots(obj: Any, child: ChildConfig, seen: set[int] | None = None) -> Iterator[Any]:
    """The resources containing ``obj``: before and after the change, up every level."""
    seen = set() if seen is None else seen
    relationship = child.relationship()
    # PASSIVE_OFF loads an unloaded relationship; a deleted child's row still
    # exists during before_flush, so its parent is found.
    history = attributes.get_history(obj, relationship.key)
    parents = [*history.added, *history.unchanged, *history.deleted]
    # The foreign key names parents the relationship may not show: the old
    # one of a moved child (a many-to-one set without its old value loaded
    # records none), or one set through the key column alone.
    parents.extend(_parents_by_foreign_key(obj, relationship, parents))
    for parent in parents:
        if parent is None or id(parent) in seen:
            continue
        seen.add(id(parent))
        parent_res, parent_child = roles_of(type(parent))
        if parent_res is not None:
            yield parent
        if parent_child is not None:
            yield from _roots(parent, parent_child, seen)


def _parents_by_foreign_key(
    obj: Any, relationship: RelationshipProperty[Any], known: list[Any]
) -> Iterator[Any]:
    """Parents named by the foreign key's values before and after the change.

    Before the flush the key columns still hold what the application set (or
    the committed value), since the ORM syncs them from the relationship only
    during the flush.
    """
    if relationship.uselist:
        return
    state: InstanceState[Any] = inspect(obj)
    session = state.session
    if session is None:
        return
    local_for = {remote: local for local, remote in relationship.local_remote_pairs}
    parent_mapper = relationship.mapper
    key_props = []
    for column in parent_mapper.primary_key:
        local = local_for.get(column)
        if local is None:
            return
        key_props.append(state.mapper.get_property_by_column(local).key)
    histories = [state.attrs[key].history for key in key_props]
    current = tuple(next(iter(h.added or h.unchanged), None) for h in histories)
    before = tuple(next(iter(h.deleted or h.unchanged), None) for h in histories)
    known_ids = {inspect(p).identity for p in known if p is not None}
    for ident in dict.fromkeys((current, before)):
        if None in ident or ident in known_ids:
            continue
        parent = session.get(parent_mapper.class_, ident)
        if parent is not None:
            yield parent


def _child_collection_changed(obj: Any) -> bool:
    """True when a relationship to a child class changed (covers one-way collections)."""
    keys = child_relationship_keys(type(obj))
    if not keys:
        return False
    state: InstanceState[Any] = inspect(obj)
    return any(state.attrs[key].history.has_changes() for key in keys)


def _initial_version(config: ResourceConfig, obj: Any) -> None:
    key = config.version_key
    if key is not None and not config.version_is_mapper_col and getattr(obj, key) is None:
        setattr(obj, key, 1)


def _bump_version(
    config: ResourceConfig, obj: Any, state: InstanceState[Any], *, own_update: bool
) -> None:
    """Make this flush UPDATE the resource row (new version, row lock), once.

    A child-only change would otherwise leave the parent row untouched: no new
    version, and no row lock ordering concurrent writers of the same resource.
    """
    key = config.version_key
    if key is not None:
        if state.attrs[key].history.has_changes():
            return  # the application set the version itself
        if config.version_is_mapper_col:
            generator = config.mapper.version_id_generator
            if own_update:
                return  # SQLAlchemy increments version_id_col with the row's own UPDATE
            if generator is False:
                # Versions are assigned by the server: any UPDATE makes it bump.
                attributes.flag_modified(obj, key)
            elif callable(generator):
                setattr(obj, key, generator(getattr(obj, key)))
        else:
            setattr(obj, key, (getattr(obj, key) or 0) + 1)
        return
    anchor = config.anchor_key
    if not own_update and anchor is not None:
        getattr(obj, anchor)  # flag_modified needs the value loaded
        attributes.flag_modified(obj, anchor)


# --- emitting, at the root commit ----------------------------------------------


def _before_commit(session: Session) -> None:
    if session.get_nested_transaction() is not None and not _root_committing(session):
        return  # a SAVEPOINT is released: its touches stay until the root commits
    tracker = _tracker(session)
    session.flush()
    _emit(session, tracker)
    tracker.sealed = True


def _root_committing(session: Session) -> bool:
    # Committing the root while a SAVEPOINT is still open calls before_commit
    # with the SAVEPOINT current; the root then has a state change in progress.
    root = session.get_transaction()
    return root is not None and getattr(root, "_current_fn", None) is not None


def _after_flush_postexec(session: Session, _context: UOWTransaction) -> None:
    tracker = session.info.get(_TRACKER_KEY)
    if isinstance(tracker, _Tracker) and tracker.sealed and tracker.pending:
        # Changes made after the commit's events were built (another
        # before_commit listener): publish them too rather than lose them.
        _emit(session, tracker)


def _emit(session: Session, tracker: _Tracker) -> None:
    touches = tracker.take()
    if not touches:
        return
    try:
        rows = _build_rows(session, touches)
    except BaseException:
        # Nothing was written: keep the record, so that a commit retried
        # after fixing the content publishes the same net effect.
        tracker.put_back(touches)
        raise
    if rows:
        # Every row was built and validated before the first is written.
        write_session_rows(session, rows)


def _build_rows(session: Session, touches: list[tuple[int, _Touch]]) -> list[dict[str, Any]]:
    groups: dict[object, list[_Touch]] = {}
    for _seq, (obj, kind) in touches:
        state: InstanceState[Any] = inspect(obj)
        identity = state.key if state.key is not None else ("transient", id(obj))
        groups.setdefault(identity, []).append((obj, kind))
    rows: list[dict[str, Any]] = []
    options = options_of(session.info)
    schemas = schemas_for(session, options) if groups else None
    for entries in groups.values():
        action = _net_action([kind for _, kind in entries])
        obj = entries[-1][0]
        config = roles_of(type(obj))[0]
        assert config is not None
        if action is None or action not in config.actions:
            continue
        rows.append(_row(config, obj, action, options, schemas))
    return rows


def _net_action(kinds: list[str]) -> Action | None:
    own = [kind for kind in kinds if kind != CHILD]
    existed = not own or own[0] != INSERT
    exists = not own or own[-1] != DELETE
    if existed and exists:
        return Action.UPDATE
    if exists:
        return Action.CREATE
    if existed:
        return Action.DELETE
    return None


def _row(
    config: ResourceConfig,
    obj: Any,
    action: Action,
    options: ProducerOptions,
    schemas: Schemas | None,
) -> dict[str, Any]:
    try:
        if config.modes[action] == "reference":
            content: Any = config.reference(obj)
        else:
            content = config.serializer(obj)
            if config.validator is not None and isinstance(content, Mapping):
                config.validator(config.schema, content)
        version = getattr(obj, config.version_key) if config.version_key else None
        headers = {"outbox-resource-version": str(version)} if version is not None else None
        exchange = routing_key = None
        if config.exchange is not None or config.routing_key is not None:
            fields = content.to_dict() if isinstance(content, ResourceReference) else content
            if not isinstance(fields, Mapping):
                fields = {}
            if config.exchange is not None:
                exchange = destination(
                    "exchange", config.exchange, obj, action, config.resource_type, fields
                )
            if config.routing_key is not None:
                routing_key = destination(
                    "routing_key", config.routing_key, obj, action, config.resource_type, fields
                )
        return prepare_row(
            Envelope(action=action, schema=config.schema, content=content),
            key=config.ordering_key(obj),
            resource_type=config.resource_type,
            routing_key=routing_key,
            headers=headers,
            options=options,
            schemas=schemas,  # validates the content against the schema registry
            exchange=exchange,
        )
    except (SQLAlchemyError, ConfigurationError, StoreError):
        raise  # not a problem of this content (StoreError: reading the schema registry)
    except Exception as exc:
        raise ResourceContentError(
            f"cannot publish the {action.value} event of {config.describe(obj)} "
            f"(schema {config.schema}): {exc}"
        ) from exc


# --- bulk statements -------------------------------------------------------------


def _do_orm_execute(state: ORMExecuteState) -> None:
    if not (state.is_update or state.is_delete or state.is_insert):
        return
    if state.execution_options.get(BYPASS_OPTION):
        return
    mappers = [state.bind_mapper] if state.bind_mapper is not None else state.all_mappers
    for mapper in mappers:
        if mapper is None:
            continue
        published = [m.class_ for m in mapper.self_and_descendants if is_published(m.class_)]
        if published:
            verb = "insert" if state.is_insert else "update" if state.is_update else "delete"
            raise BulkChangeError(
                f"a bulk {verb} of {published[0].__name__} bypasses the unit of work, so outbox "
                f"cannot publish the events of the rows it changes. Load the objects and change "
                f"them through the session instead, or publish the events yourself with "
                f"outbox.publish() and pass .execution_options({BYPASS_OPTION}=True)"
            )


# --- instrumenting a factory -----------------------------------------------------

_LISTENERS: tuple[tuple[str, Any], ...] = (
    ("before_flush", _before_flush),
    ("after_flush_postexec", _after_flush_postexec),
    ("before_commit", _before_commit),
    ("do_orm_execute", _do_orm_execute),
)

Factory = Any


def instrument(factory: Factory) -> Factory:
    """Publish the resource changes made through ``factory``'s sessions; returns ``factory``.

    ``factory`` is a ``sessionmaker``, ``scoped_session``, ``async_sessionmaker``,
    ``async_scoped_session``, a ``Session`` subclass, or one session. Only that
    factory is affected: sessions from other factories publish nothing.
    """
    target: Any = factory
    if isinstance(target, scoped_session):
        target = target.session_factory
    # The asyncio extension needs greenlet; only look at it when the caller uses it.
    aio: Any = sys.modules.get("sqlalchemy.ext.asyncio")
    if aio is not None and isinstance(target, aio.async_scoped_session):
        target = target.session_factory
    if aio is not None and isinstance(target, aio.async_sessionmaker):
        base = target.kw.get("sync_session_class") or target.class_.sync_session_class
        if not getattr(base, _MARKER, False):
            # A subclass of its own, so that other factories sharing the
            # base class stay untouched.
            sync_class = type(base.__name__, (base,), {"__module__": base.__module__})
            _listen(sync_class)
            target.kw["sync_session_class"] = sync_class
    elif isinstance(target, sessionmaker):
        _listen(target.class_)
    elif aio is not None and isinstance(target, aio.AsyncSession):
        _listen(target.sync_session)
    elif isinstance(target, Session):
        _listen(target)
    elif aio is not None and isinstance(target, type) and issubclass(target, aio.AsyncSession):
        if target is aio.AsyncSession:
            raise ConfigurationError(
                "instrument(AsyncSession) would affect every async session; "
                "pass an async_sessionmaker or a subclass"
            )
        base = getattr(target, "sync_session_class", Session)
        if not getattr(base, _MARKER, False):
            sync_class = type(base.__name__, (base,), {"__module__": base.__module__})
            _listen(sync_class)
            setattr(target, "sync_session_class", sync_class)  # noqa: B010
    elif isinstance(target, type) and issubclass(target, Session):
        if target is Session:
            raise ConfigurationError(
                "instrument(Session) would affect every session in the process; "
                "pass a sessionmaker or a Session subclass"
            )
        _listen(target)
    else:
        raise ConfigurationError(
            f"cannot instrument {type(factory).__name__}: pass a sessionmaker, "
            "async_sessionmaker, scoped_session, Session subclass or a session"
        )
    return factory


def _listen(target: type[Session] | Session) -> None:
    if isinstance(target, Session):
        if getattr(type(target), _MARKER, False) or target.info.get(_MARKER):
            return
        target.info[_MARKER] = True
    else:
        if getattr(target, _MARKER, False):
            return  # this class or a base is instrumented already
        setattr(target, _MARKER, True)
    for name, listener in _LISTENERS:
        event.listen(target, name, listener)
    # SAVEPOINT marks; a rolled-back SAVEPOINT takes back its touches.
    track(target, _TRACKER_KEY, _Tracker)
