"""Apply the packaged Alembic migrations (``outbox migrate``)."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

VERSION_TABLE = "outbox_alembic_version"


def alembic_config(engine: Engine, *, partitions: int | None = None) -> Config:
    """An Alembic config pointing at the migrations shipped in the package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("outbox._migrations")))
    config.attributes["engine"] = engine
    if partitions is not None:
        config.attributes["outbox_partitions"] = partitions
    return config


def upgrade(engine: Engine, *, revision: str = "heads", partitions: int | None = None) -> None:
    config = alembic_config(engine, partitions=partitions)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, *, revision: str = "base") -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """The applied revision, or None when the outbox tables were never migrated."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
