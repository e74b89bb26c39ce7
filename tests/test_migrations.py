"""The Alembic migrations produce exactly ``outbox.table.metadata``, downgrade
cleanly, run from the repository root, and can be included in a service's own
Alembic history (as docs/quickstart.md describes)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, Identity, func, inspect, select, text

from outbox import migrate, table
from outbox.database import create_outbox_engine
from tests.conftest import pg_url
from tests.docblocks import code_blocks

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUTBOX_TABLES = set(table.metadata.tables)
HEAD = "outbox_0002"
SERVICE_SECTION = "Include the outbox migrations in your service's Alembic history"


def _diff(engine: Engine) -> list[Any]:
    def only_not_version_table(name: str | None, type_: str, _parent: Any) -> bool:
        return not (type_ == "table" and name == migrate.VERSION_TABLE)

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": only_not_version_table,
            },
        )
        diff = list(compare_metadata(context, table.metadata))
    if engine.dialect.name == "sqlite":
        # SQLite has no IDENTITY: its auto-increment is the INTEGER PRIMARY KEY
        # (rowid alias) the migration creates, so alembic always reports the
        # metadata's Identity() as a missing default there. Nothing else is ignored.
        diff = [d for d in diff if not _is_identity_only(d)]
    return diff


def _is_identity_only(entry: Any) -> bool:
    changes = entry if isinstance(entry, list) else [entry]
    return all(
        change[0] == "modify_default" and isinstance(change[-1], Identity) for change in changes
    )


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


@pytest.fixture
def empty_pg_engine(empty_pg_database: str) -> Any:
    engine = create_outbox_engine(pg_url(empty_pg_database))
    yield engine
    engine.dispose()


@pytest.fixture
def empty_sqlite_engine(tmp_path: Path) -> Any:
    engine = create_outbox_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_engine(request: pytest.FixtureRequest) -> Engine:
    """An engine on an empty database, once per backend."""
    fixture = "empty_pg_engine" if request.param == "postgresql" else "empty_sqlite_engine"
    engine: Engine = request.getfixturevalue(fixture)
    return engine


def test_migrations_equal_the_metadata_and_downgrade_removes_everything(
    empty_engine: Engine,
) -> None:
    engine = empty_engine
    assert _tables(engine) == set()

    migrate.upgrade(engine)

    assert _tables(engine) == OUTBOX_TABLES | {migrate.VERSION_TABLE}
    assert _diff(engine) == []
    assert migrate.current_revision(engine) == migrate.head_revision(engine)
    with engine.connect() as connection:
        partitions = connection.execute(text("SELECT count(*) FROM outbox_partition")).scalar()
    assert partitions == table.DEFAULT_PARTITIONS

    migrate.downgrade(engine)

    assert _tables(engine) & OUTBOX_TABLES == set()
    assert migrate.current_revision(engine) is None
    # And up again: the downgrade left nothing behind that blocks a re-install.
    migrate.upgrade(engine)
    assert _diff(engine) == []


def test_the_diff_check_catches_a_drift(empty_pg_engine: Engine) -> None:
    """The comparison above can fail: a missing index is reported."""
    migrate.upgrade(empty_pg_engine)
    with empty_pg_engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_outbox_event_pending"))
    assert _diff(empty_pg_engine) != []


def test_upgrade_from_0001_keeps_rows_and_indexes_only_undelivered_ids_and_keys(
    empty_engine: Engine,
) -> None:
    engine = empty_engine
    migrate.upgrade(engine, revision="outbox_0001")
    rows = [
        {"state": state, "event_id": uuid.uuid4(), "ordering_key": f"case:1:{i}"}
        for i, state in enumerate(["pending", "delivered", "dead", "skipped"])
    ]
    with engine.begin() as connection:
        for row in rows:
            connection.execute(
                table.event.insert().values(
                    partition=0,
                    routing_key="case.update",
                    resource_type="case",
                    payload="{}",
                    **row,
                )
            )

    migrate.upgrade(engine)

    assert migrate.current_revision(engine) == HEAD
    assert _diff(engine) == []
    with engine.connect() as connection:
        kept = connection.execute(select(table.event.c.event_id, table.event.c.state)).all()
    assert sorted(kept) == sorted((r["event_id"], r["state"]) for r in rows)
    indexes = {i["name"]: i for i in inspect(engine).get_indexes("outbox_event")}
    assert "ix_outbox_event_key_position" not in indexes
    for name in ("ix_outbox_event_undelivered_id", "ix_outbox_event_undelivered_key"):
        where = str(indexes[name]["dialect_options"][f"{engine.dialect.name}_where"])
        # PostgreSQL returns the predicate normalised: ((state)::text <> 'delivered'::text)
        assert "<> 'delivered'" in where and "state" in where
    assert inspect(engine).get_unique_constraints("outbox_event") == []

    migrate.downgrade(engine, revision="outbox_0001")

    assert [c["column_names"] for c in inspect(engine).get_unique_constraints("outbox_event")] == [
        ["event_id"]
    ]
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(table.event)).scalar() == 4


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(extra)
    return env


def test_alembic_upgrade_head_from_the_repository_root(empty_pg_database: str) -> None:
    url = pg_url(empty_pg_database)
    result = subprocess.run(
        [str(BIN / "alembic"), "upgrade", "head"],
        cwd=ROOT,
        env=_env(OUTBOX_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    engine = create_outbox_engine(url)
    try:
        assert _tables(engine) == OUTBOX_TABLES | {migrate.VERSION_TABLE}
        assert migrate.current_revision(engine) == HEAD
    finally:
        engine.dispose()


SERVICE_REVISION = """
\"\"\"Create the service's own table.\"\"\"

import sqlalchemy as sa
from alembic import op

revision = "svc_0001"
down_revision = None
branch_labels = ("service",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "case",
        sa.Column("tenant_id", sa.Integer, primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("case")
"""


def service_blocks() -> dict[str, str]:
    """The blocks of docs/quickstart.md that set up a service's Alembic project."""
    blocks = [b for b in code_blocks("quickstart.md") if b.section == SERVICE_SECTION]
    assert [b.language for b in blocks] == ["bash", "ini", "python", "bash"]
    find_path, ini, env_py, upgrade = (b.code for b in blocks)
    return {"find_path": find_path, "ini": ini, "env_py": env_py, "upgrade": upgrade}


def test_a_service_alembic_history_includes_our_revisions(
    tmp_path: Path, empty_pg_database: str
) -> None:
    """Follows docs/quickstart.md exactly: its command, its alembic.ini, its env.py."""
    docs = service_blocks()
    # The documented one-liner finds the installed package's revisions.
    command = shlex.split(docs["find_path"])
    assert command[0] == "python"
    found = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=60, check=True
    )
    versions_path = found.stdout.strip()
    assert Path(versions_path, "0001_outbox_tables.py").exists()

    service = tmp_path / "service"
    (service / "migrations" / "versions").mkdir(parents=True)
    (service / "migrations" / "env.py").write_text(docs["env_py"])
    (service / "migrations" / "versions" / "svc_0001_case.py").write_text(SERVICE_REVISION)
    url = pg_url(empty_pg_database).replace("postgresql://", "postgresql+psycopg://")
    ini = docs["ini"].replace("/path/printed/above", versions_path)
    (service / "alembic.ini").write_text(f"{ini}sqlalchemy.url = {url}\n")

    assert shlex.split(docs["upgrade"]) == ["alembic", "upgrade", "heads"]
    result = subprocess.run(
        [str(BIN / "alembic"), "upgrade", "heads"],
        cwd=service,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    engine = create_outbox_engine(url)
    try:
        assert _tables(engine) == OUTBOX_TABLES | {"case", "alembic_version"}
        with engine.connect() as connection:
            versions = set(
                connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
            )
        # One head per branch: ours is recorded in the service's version table.
        assert versions == {"svc_0001", HEAD}
        assert migrate.current_revision(engine) is None  # not in outbox_alembic_version
        # Our tables are exactly the metadata; the only other table is the service's.
        diff = _diff(engine)
        assert [d[1].name for d in diff] == ["case"]
        assert {d[0] for d in diff} == {"remove_table"}
    finally:
        engine.dispose()
