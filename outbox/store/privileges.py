"""What the relay's database role may do, table by table: the one list.

``outbox check`` verifies these privileges (:mod:`outbox.ops.check`);
``sql/relay_role.sql``, which ``outbox grant-relay-role`` runs and DBAs apply
with psql, grants them (tests/acceptance/test_security.py proves it grants exactly
these). Add a table the relay uses here and to the SQL file together.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from outbox.store import table
from outbox.store.migrate import VERSION_TABLE

RELAY_PRIVILEGES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        # Fetch pending rows, mark them delivered or dead, purge (retention, delete on delivery).
        table.event.name: ("SELECT", "UPDATE", "DELETE"),
        # Leases: SELECT ... FOR UPDATE SKIP LOCKED needs UPDATE.
        table.partition.name: ("SELECT", "UPDATE"),
        # Each relay registers itself, heartbeats, and removes stale registrations.
        table.relay.name: ("SELECT", "INSERT", "UPDATE", "DELETE"),
        table.schema.name: ("SELECT",),
        # The installed revision, for readiness; the service's alembic_version
        # instead when its own Alembic history applies our migrations.
        VERSION_TABLE: ("SELECT",),
    }
)
