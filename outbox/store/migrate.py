"""Apply the packaged Alembic migrations (``outbox migrate``) and tell which one is installed.

Our revisions are recorded in one of two version tables: ``outbox_alembic_version``
when ``outbox migrate`` (or ``alembic upgrade head`` from a clone) applied them,
or the service's ``alembic_version`` when the service's own Alembic history
includes them (docs/quickstart.md). :func:`installed_revision` looks in both,
and every reader of "which revision is installed" calls it: ``outbox status``,
``outbox check``, ``/readyz`` and ``outbox migrate`` itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DBAPIError

from outbox.errors import OutboxError, StoreError
from outbox.logs import emit
from outbox.redaction import redact

VERSION_TABLE = "outbox_alembic_version"
# Where a service's Alembic history records its heads, ours among them (Alembic's default).
SERVICE_VERSION_TABLE = "alembic_version"
# Every revision we ship is named outbox_NNNN; that is how ours are told from a service's.
REVISION_PREFIX = "outbox_"

log = logging.getLogger("outbox.store.migrate")


@dataclass(frozen=True, kw_only=True)
class Installed:
    """Our applied revision and the version table recording it; both None when never migrated."""

    revision: str | None
    version_table: str | None

    @property
    def by_service(self) -> bool:
        """The service's Alembic history applied our revisions: it alone may upgrade them."""
        return self.version_table == SERVICE_VERSION_TABLE

    @property
    def upgrade_command(self) -> str:
        if self.by_service:
            return "`alembic upgrade heads` in the service's Alembic project"
        if self.revision is None:
            return "`outbox migrate` (or `alembic upgrade heads` if the service's history has ours)"
        return "`outbox migrate`"


def alembic_config(engine: Engine, *, partitions: int | None = None) -> Config:
    """An Alembic config pointing at the migrations shipped in the package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("outbox._migrations")))
    config.attributes["engine"] = engine
    if partitions is not None:
        config.attributes["outbox_partitions"] = partitions
    return config


def upgrade(engine: Engine, *, revision: str = "heads", partitions: int | None = None) -> None:
    """Apply our revisions up to ``revision``, recorded in ``outbox_alembic_version``.

    When the service's Alembic history recorded our revisions in its
    ``alembic_version``, nothing is applied here: at the target already, this
    says so; behind it, this refuses, because recording the same revisions a
    second time in our own table would create the tables twice, and the
    service's next ``alembic upgrade heads`` would apply them again.
    """
    installed = installed_revision(engine)
    if installed.by_service:
        target = head_revision(engine) if revision in ("head", "heads") else revision
        if installed.revision != target:
            raise OutboxError(
                f"the outbox tables are at revision {installed.revision}, recorded in "
                f"{SERVICE_VERSION_TABLE} by the service's Alembic history: upgrade them there "
                "with `alembic upgrade heads`, not with `outbox migrate`"
            )
        emit(
            log,
            "migrate_done_by_service",
            "outbox tables already at %s, recorded in %s by the service's Alembic history",
            installed.revision,
            SERVICE_VERSION_TABLE,
            revision=installed.revision,
            version_table=SERVICE_VERSION_TABLE,
        )
        return
    if installed.revision is None and inspect(engine).has_table("outbox_event"):
        raise OutboxError(
            f"the outbox tables exist but neither {VERSION_TABLE} nor {SERVICE_VERSION_TABLE} "
            "records an outbox revision; when the service's Alembic history includes ours, a "
            'service revision must say depends_on = "outbox" (our branch label), not name our '
            "head revision (see docs/quickstart.md)"
        )
    config = alembic_config(engine, partitions=partitions)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, *, revision: str = "base") -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def installed_revision(engine: Engine) -> Installed:
    """Our applied revision, from our own version table or else from the service's.

    Our own table is read first, so that a role that may read only the outbox
    tables (the relay's) needs nothing more where ``outbox migrate`` applied
    them. The service's table holds one head per branch, and ours is the one
    named ``outbox_...``. (When a service revision lists our head revision in
    ``depends_on``, Alembic records only the service's revision; ours is then
    found nowhere, which is why the docs say ``depends_on = "outbox"``.)
    """
    with engine.connect() as connection:
        own = _heads(connection, VERSION_TABLE)
        if own:
            return Installed(revision=own[0], version_table=VERSION_TABLE)
        try:
            service = _heads(connection, SERVICE_VERSION_TABLE)
        except DBAPIError as exc:
            first = redact(str(exc.orig or exc)).strip().splitlines()
            raise StoreError(
                f"cannot read {SERVICE_VERSION_TABLE}, where the service's Alembic history "
                f"records the outbox revision ({first[0] if first else type(exc).__name__}): "
                f"GRANT SELECT ON {SERVICE_VERSION_TABLE} to this role"
            ) from exc
    ours = sorted(head for head in service if head.startswith(REVISION_PREFIX))
    if not ours:
        return Installed(revision=None, version_table=None)
    # One branch has one head, so there is one; the newest, should a table hold more.
    return Installed(revision=ours[-1], version_table=SERVICE_VERSION_TABLE)


def current_revision(engine: Engine) -> str | None:
    """The applied revision, or None when the outbox tables were never migrated."""
    return installed_revision(engine).revision


def _heads(connection: Connection, version_table: str) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    return context.get_current_heads()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
