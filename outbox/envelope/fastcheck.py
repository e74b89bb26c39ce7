"""A fast, exact check of the event envelope, for the relay's hot path.

:func:`outbox.validation.check_envelope` runs jsonschema, which costs tens of
microseconds per event: more than publishing it. The envelope schema
(``event.schema.json``) is small and fixed, so the same rules are written out
here as plain comparisons:

- the document is an object with exactly the keys ``action`` and ``resource``;
- ``action`` is the string ``create``, ``update`` or ``delete``;
- ``resource`` is an object with exactly the keys ``schema`` and ``content``;
- ``schema`` is a non-empty string that is an RFC 3986 URI (the schema's
  ``format: uri``, checked by the same checker jsonschema uses, memoised
  because the same few schema URIs repeat);
- ``content`` is an object.

``tests/unit/envelope/test_fastcheck.py`` proves with hypothesis that :func:`is_valid_envelope`
agrees with the jsonschema validator on generated documents, valid and
invalid. When it says no, :func:`check_envelope` asks jsonschema for the
message, so errors read the same as before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jsonschema import FormatChecker

from outbox.envelope import validation

_ACTIONS = ("create", "update", "delete")
_TOP_KEYS = frozenset(("action", "resource"))
_RESOURCE_KEYS = frozenset(("schema", "content"))
_URI = FormatChecker(["uri"])


@lru_cache(maxsize=4096)
def _is_uri(text: str) -> bool:
    return _URI.conforms(text, "uri")


def is_valid_envelope(data: Any) -> bool:
    """True exactly when ``data`` matches ``event.schema.json``."""
    if not isinstance(data, dict) or data.keys() != _TOP_KEYS:
        return False
    action = data["action"]
    if not isinstance(action, str) or action not in _ACTIONS:
        return False
    resource = data["resource"]
    if not isinstance(resource, dict) or resource.keys() != _RESOURCE_KEYS:
        return False
    schema = resource["schema"]
    return (
        isinstance(schema, str)
        and len(schema) >= 1
        and isinstance(resource["content"], dict)
        and _is_uri(schema)
    )


def check_envelope(data: Any) -> None:
    """Raise :class:`~outbox.errors.EnvelopeError` unless ``data`` is a valid envelope."""
    if not is_valid_envelope(data):
        validation.check_envelope(data)  # raises, with jsonschema's explanation
