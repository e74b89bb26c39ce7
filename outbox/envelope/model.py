"""The event envelope of the spec, as immutable values. No I/O here.

``Envelope`` serialises to exactly the shape of ``event.schema.json``::

    {"action": "update", "resource": {"schema": "<uri>", "content": {...}}}
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbox.envelope import codec
from outbox.envelope.jsontext import parse_json
from outbox.errors import EnvelopeError


class Action(enum.StrEnum):
    """The lifecycle event that happened to the resource (a ``str``)."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, kw_only=True, slots=True)
class ResourceReference:
    """A pointer to a resource, carried instead of its content (deletes, bandwidth)."""

    tenant_id: int | float
    id: int | float
    version: int | float

    def to_dict(self) -> dict[str, int | float]:
        return {"tenantId": self.tenant_id, "id": self.id, "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResourceReference:
        try:
            return cls(tenant_id=data["tenantId"], id=data["id"], version=data["version"])
        except KeyError as exc:
            raise EnvelopeError(
                f"a ResourceReference needs tenantId, id and version: {exc}"
            ) from None

    @staticmethod
    def looks_like(data: Mapping[str, Any]) -> bool:
        """True when ``data`` has exactly the three numeric fields of a reference."""
        return set(data) == {"tenantId", "id", "version"} and all(
            isinstance(data[k], int | float) and not isinstance(data[k], bool) for k in data
        )


Content = Mapping[str, Any] | ResourceReference


@dataclass(frozen=True, kw_only=True, slots=True)
class Envelope:
    """What happened (``action``) to which resource (``content``, conforming to ``schema``)."""

    action: Action
    schema: str
    content: Content

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "action", Action(self.action))
        except ValueError:
            allowed = ", ".join(a.value for a in Action)
            raise EnvelopeError(f"action must be one of {allowed}, got {self.action!r}") from None

    @property
    def reference(self) -> ResourceReference | None:
        """The content as a reference, when the producer sent one."""
        if isinstance(self.content, ResourceReference):
            return self.content
        if ResourceReference.looks_like(self.content):
            return ResourceReference.from_dict(self.content)
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready shape of the event schema (content encoded losslessly)."""
        content = (
            self.content.to_dict()
            if isinstance(self.content, ResourceReference)
            else codec.to_jsonable(self.content, "resource.content")
        )
        return {
            "action": self.action.value,
            "resource": {"schema": self.schema, "content": content},
        }

    def to_json(self) -> str:
        return codec.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Envelope:
        """Build from the schema's shape; call :func:`outbox.validation.check_envelope` first."""
        try:
            resource = data["resource"]
            return cls(
                action=data["action"], schema=resource["schema"], content=resource["content"]
            )
        except (KeyError, TypeError) as exc:
            raise EnvelopeError(f"not an event envelope: missing {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        try:
            data = parse_json(text)
        except ValueError as exc:
            raise EnvelopeError(f"envelope is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EnvelopeError("envelope must be a JSON object")
        return cls.from_dict(data)
