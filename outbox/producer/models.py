"""Declaring mapped classes as published resources and their children.

``@resource`` and ``@child_of`` only attach a description to the class; the
session hooks (:mod:`outbox.producer.hooks`) read it. Mapper details (version column,
relationships) are resolved lazily, on first use, because relationships may
name classes that are declared later.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, RelationshipProperty

from outbox.envelope import codec, fastcheck
from outbox.envelope.model import Action, ResourceReference
from outbox.errors import ConfigurationError

ContentMode = Literal["full", "reference"]
Serializer = Callable[[Any], Mapping[str, Any]]
Validator = Callable[[str, Mapping[str, Any]], None]
# A string template ("cases.{tenantId}") or a function of the object and the action.
Destination = str | Callable[[Any, Action], str]

_RESOURCE_ATTR = "__outbox_resource__"
_CHILD_ATTR = "__outbox_child__"
_DEFAULT_MODES: dict[Action, ContentMode] = {
    Action.CREATE: "full",
    Action.UPDATE: "full",
    Action.DELETE: "reference",
}

T = TypeVar("T", bound=type)


def camel_case(name: str) -> str:
    """``tenant_id`` -> ``tenantId``; names without underscores are kept."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def snake_case(name: str) -> str:
    """``CaseNote`` -> ``case_note``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def column_content(obj: Any) -> dict[str, Any]:
    """The default serializer: every mapped column attribute, keys in camelCase.

    Values are kept as Python objects here; the envelope encodes them
    losslessly (datetime, Decimal, UUID... see :mod:`outbox.envelope.codec`) and refuses
    values that have no JSON form.
    """
    names = _column_names.get(type(obj))
    if names is None:
        mapper = inspect(type(obj))
        names = _column_names[type(obj)] = [
            (attr.key, camel_case(attr.key)) for attr in mapper.column_attrs
        ]
    return {field: getattr(obj, key) for key, field in names}


_column_names: dict[type, list[tuple[str, str]]] = {}


@dataclass(eq=False, kw_only=True)
class ResourceConfig:
    """How one mapped class is published (see :func:`outbox.resource`)."""

    cls: type
    schema: str
    resource_type: str
    actions: frozenset[Action]
    modes: dict[Action, ContentMode]
    serializer: Serializer
    validator: Validator | None
    tenant_attr: str
    id_attr: str
    version_attr: str | None
    key: Callable[[Any], str] | None
    exchange: Destination | None = None
    routing_key: Destination | None = None
    _version_resolved: bool = field(default=False, repr=False)
    _version_key: str | None = field(default=None, repr=False)
    _version_is_mapper_col: bool = field(default=False, repr=False)
    _anchor_key: str | None = field(default=None, repr=False)

    @property
    def mapper(self) -> Mapper[Any]:
        return _mapper_of(self.cls)

    def describe(self, obj: Any) -> str:
        """``Case(tenant_id=1, id=42)``: how errors name an instance."""
        values = ", ".join(
            f"{attr}={obj.__dict__.get(attr)!r}" for attr in (self.tenant_attr, self.id_attr)
        )
        return f"{self.cls.__name__}({values})"

    def resolve(self) -> None:
        """Find the version attribute and an attribute to touch for a forced UPDATE."""
        if self._version_resolved:
            return
        mapper = self.mapper
        column_keys = [attr.key for attr in mapper.column_attrs]
        for needed in (self.tenant_attr, self.id_attr):
            if needed not in column_keys:
                raise ConfigurationError(
                    f"{self.cls.__name__} is a published resource but has no mapped attribute "
                    f"{needed!r}; pass tenant_id=... / id=... to outbox.resource"
                )
        version_key = self.version_attr
        mapper_version_key: str | None = None
        if mapper.version_id_col is not None:
            mapper_version_key = mapper.get_property_by_column(mapper.version_id_col).key
        if version_key is None:
            version_key = mapper_version_key or ("version" if "version" in column_keys else None)
        elif version_key not in column_keys:
            raise ConfigurationError(
                f"{self.cls.__name__}: version attribute {version_key!r} is not a mapped column"
            )
        if version_key is None and "reference" in self.modes.values():
            raise ConfigurationError(
                f"{self.cls.__name__} publishes ResourceReferences, which need a version: "
                "add a version column (e.g. __mapper_args__ = {'version_id_col': ...}) "
                "or pass version='attribute' to outbox.resource"
            )
        primary = {mapper.get_property_by_column(c).key for c in mapper.primary_key}
        anchors = [k for k in column_keys if k not in primary and k != version_key]
        self._version_key = version_key
        self._version_is_mapper_col = version_key is not None and version_key == mapper_version_key
        self._anchor_key = anchors[0] if anchors else None
        self._version_resolved = True

    @property
    def version_key(self) -> str | None:
        self.resolve()
        return self._version_key

    @property
    def version_is_mapper_col(self) -> bool:
        self.resolve()
        return self._version_is_mapper_col

    @property
    def anchor_key(self) -> str | None:
        self.resolve()
        return self._anchor_key

    def reference(self, obj: Any) -> ResourceReference:
        version = getattr(obj, self.version_key) if self.version_key else 0
        return ResourceReference(
            tenant_id=getattr(obj, self.tenant_attr), id=getattr(obj, self.id_attr), version=version
        )

    def ordering_key(self, obj: Any) -> str:
        if self.key is not None:
            return self.key(obj)
        tenant = codec.to_jsonable(getattr(obj, self.tenant_attr), self.tenant_attr)
        ident = codec.to_jsonable(getattr(obj, self.id_attr), self.id_attr)
        return f"{self.resource_type}:{tenant}:{ident}"


@dataclass(eq=False, kw_only=True)
class ChildConfig:
    """A contained class: changing it is an update of the resource behind ``parent``."""

    cls: type
    parent: str
    _relationship: RelationshipProperty[Any] | None = field(default=None, repr=False)

    def relationship(self) -> RelationshipProperty[Any]:
        if self._relationship is not None:
            return self._relationship
        mapper = _mapper_of(self.cls)
        try:
            self._relationship = mapper.relationships[self.parent]
            return self._relationship
        except KeyError:
            raise ConfigurationError(
                f"@outbox.child_of({self.parent!r}) on {self.cls.__name__}: "
                f"{self.cls.__name__} has no relationship named {self.parent!r}"
            ) from None


def _check_template(what: str, spec: Destination | None) -> None:
    """Refuse at declaration a template that could never be formatted by field name."""
    if spec is None or callable(spec):
        return
    if not isinstance(spec, str) or not spec:
        raise ConfigurationError(
            f"outbox.resource({what}=...): a non-empty string template or a callable "
            f"(obj, action) -> str, got {spec!r}"
        )
    try:
        parsed = list(string.Formatter().parse(spec))
    except ValueError as exc:
        raise ConfigurationError(f"outbox.resource({what}=...): {spec!r}: {exc}") from None
    for _literal, name, _format, _conversion in parsed:
        if name is not None and not name.isidentifier():
            raise ConfigurationError(
                f"outbox.resource({what}=...): {spec!r}: fields are named by a top-level "
                f"content field, {{type}} or {{action}}; got {{{name}}}"
            )


def destination(
    what: str,
    spec: Destination,
    obj: Any,
    action: Action,
    resource_type: str,
    content: Mapping[str, Any],
) -> str:
    """The exchange or routing key ``spec`` gives for one event.

    A template is formatted with the top-level fields of the serialised
    content, ``{type}`` (the resource type) and ``{action}``; the last two win
    over content fields of the same name.
    """
    if callable(spec):
        value = spec(obj, action)
        if not isinstance(value, str):
            raise TypeError(f"the {what} function returned {type(value).__name__}, not a str")
        return value
    fields = {**content, "type": resource_type, "action": action.value}
    try:
        return spec.format_map(fields)
    except KeyError as exc:
        raise ValueError(
            f"the {what} template {spec!r} names {{{exc.args[0]}}}, which the "
            f"{action.value} event's content does not have (fields: {', '.join(sorted(fields))})"
        ) from None


def resource(
    *,
    schema: str,
    actions: Iterable[Action | str] = (Action.CREATE, Action.UPDATE, Action.DELETE),
    resource_type: str | None = None,
    content: Mapping[Action | str, ContentMode] | None = None,
    serializer: Serializer | None = None,
    validator: Validator | None = None,
    tenant_id: str = "tenant_id",
    id: str = "id",
    version: str | None = None,
    key: Callable[[Any], str] | None = None,
    exchange: Destination | None = None,
    routing_key: Destination | None = None,
) -> Callable[[T], T]:
    """Declare a mapped class a published resource (see docs/sqlalchemy.md).

    ``content`` chooses per action between ``"full"`` (the serializer's
    output) and ``"reference"`` (a ResourceReference: tenantId, id, version);
    by default create and update carry the full resource, delete a reference.
    ``validator(schema, content)`` may raise to refuse content before commit.
    ``exchange`` and ``routing_key`` route the events: a template formatted
    with the top-level fields of the serialised content, ``{type}`` and
    ``{action}`` (``"cases.{tenantId}"``), or a callable ``(obj, action) -> str``;
    by default the relay's exchange and ``<type>.<action>``.
    """
    _check_template("exchange", exchange)
    _check_template("routing_key", routing_key)
    probe = {"action": "create", "resource": {"schema": schema, "content": {}}}
    if not fastcheck.is_valid_envelope(probe):
        raise ConfigurationError(f"outbox.resource(schema=...): {schema!r} is not a URI")
    try:
        chosen = frozenset(Action(a) for a in actions)
    except ValueError as exc:
        raise ConfigurationError(f"outbox.resource(actions=...): {exc}") from None
    modes = dict(_DEFAULT_MODES)
    for action, mode in (content or {}).items():
        if mode not in ("full", "reference"):
            raise ConfigurationError(
                f"outbox.resource(content=...): mode for {action!r} must be 'full' or "
                f"'reference', got {mode!r}"
            )
        try:
            modes[Action(action)] = mode
        except ValueError as exc:
            raise ConfigurationError(f"outbox.resource(content=...): {exc}") from None

    def decorate(cls: T) -> T:
        _mapper_of(cls)  # fail now, not at the first flush, when the class is not mapped
        config = ResourceConfig(
            cls=cls,
            schema=schema,
            resource_type=resource_type or snake_case(cls.__name__),
            actions=chosen,
            modes={a: m for a, m in modes.items() if a in chosen},
            serializer=serializer or column_content,
            validator=validator,
            tenant_attr=tenant_id,
            id_attr=id,
            version_attr=version,
            key=key,
            exchange=exchange,
            routing_key=routing_key,
        )
        setattr(cls, _RESOURCE_ATTR, config)
        _forget()
        return cls

    return decorate


def child_of(parent: str) -> Callable[[T], T]:
    """Declare a mapped class contained in a resource (or in another child).

    ``parent`` names the relationship from this class to its container.
    """

    def decorate(cls: T) -> T:
        _mapper_of(cls)
        setattr(cls, _CHILD_ATTR, ChildConfig(cls=cls, parent=parent))
        _forget()
        return cls

    return decorate


Roles = tuple[ResourceConfig | None, ChildConfig | None]
_cache: dict[type, Roles] = {}


def roles_of(cls: type) -> Roles:
    """The resource and child declarations that apply to ``cls`` (inherited ones too)."""
    roles = _cache.get(cls)
    if roles is None:
        res = getattr(cls, _RESOURCE_ATTR, None)
        child = getattr(cls, _CHILD_ATTR, None)
        roles = (
            res if isinstance(res, ResourceConfig) else None,
            child if isinstance(child, ChildConfig) else None,
        )
        _cache[cls] = roles
    return roles


_child_keys: dict[type, tuple[str, ...]] = {}


def child_relationship_keys(cls: type) -> tuple[str, ...]:
    """The relationships of ``cls`` whose targets are declared children."""
    keys = _child_keys.get(cls)
    if keys is None:
        mapper = _mapper_of(cls)
        keys = tuple(
            rel.key for rel in mapper.relationships if roles_of(rel.mapper.class_)[1] is not None
        )
        _child_keys[cls] = keys
    return keys


def is_published(cls: type) -> bool:
    res, child = roles_of(cls)
    return res is not None or child is not None


def _forget() -> None:
    # A new declaration can change the roles of classes seen before.
    _cache.clear()
    _child_keys.clear()


def _mapper_of(cls: type) -> Mapper[Any]:
    try:
        mapper: Mapper[Any] = inspect(cls)
    except Exception as exc:  # NoInspectionAvailable, UnmappedClassError
        raise ConfigurationError(
            f"{getattr(cls, '__name__', cls)!r} is not a mapped class: {exc}"
        ) from None
    return mapper
