"""Ordering keys: their default form, their lock id and their partition.

The hashes must be identical in every process and release, so they come from
BLAKE2b, never from Python's randomised ``hash()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from outbox.errors import EnvelopeError

# The two-int form of pg_advisory_xact_lock(namespace, key) lives in a lock
# space of its own, so it never collides with a service's bigint advisory locks.
LOCK_NAMESPACE = 0x0B0C


def key_hash(key: str) -> int:
    """A stable unsigned 32-bit hash of an ordering key."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=4).digest(), "big")


def lock_id(key: str) -> int:
    """The signed 32-bit id of the key's advisory lock (PostgreSQL's int4)."""
    h = key_hash(key)
    return h - (1 << 32) if h >= (1 << 31) else h


def partition_of(key: str, partitions: int) -> int:
    return key_hash(key) % partitions


def default_key(resource_type: str, content: Mapping[str, Any]) -> str:
    """``<type>:<tenantId>:<id>``, from the content or the reference it carries."""
    try:
        return f"{resource_type}:{content['tenantId']}:{content['id']}"
    except KeyError:
        raise EnvelopeError(
            "cannot derive an ordering key: the content has no tenantId and id; "
            "pass key=... to publish (events with the same key are delivered in commit order)"
        ) from None


@lru_cache(maxsize=4096)  # pure, and called once per published event
def default_resource_type(schema_uri: str) -> str:
    """The last path segment of the schema URI without extension or version.

    ``https://example.org/schemas/case.json`` and ``.../case/2`` both give ``case``.
    """
    segments = [s for s in schema_uri.rstrip("/").split("/") if s]
    while segments and segments[-1].isdigit():
        segments.pop()
    name = segments[-1].split("#")[0] if segments else ""
    for suffix in (".schema.json", ".json", ".avsc"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if not name or ":" in name:
        raise EnvelopeError(
            f"cannot derive a resource type from schema {schema_uri!r}; pass resource_type=..."
        )
    return name
