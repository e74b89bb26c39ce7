"""The Alembic migrations produce exactly ``outbox.table.metadata``, downgrade
cleanly, run from the repository root, and can be included in a service's own
Alembic history (as docs/quickstart.md describes)."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, Identity, func, inspect, make_url, select, text

from outbox.ops import health
from outbox.store import migrate, table
from outbox.store.engine import create_outbox_engine
from tests.conftest import pg_url
from tests.docblocks import code_blocks
from tests.ops_support import (
    closed_port_url,
    free_port,
    get,
    relay_values,
    run_cli,
    running_relay,
    wait_for,
)
from tests.paths import ROOT

ROOT = ROOT
BIN = Path(sys.executable).parent
OUTBOX_TABLES = set(table.metadata.tables)
HEAD = "outbox_0003"
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


def test_migrate_takes_over_an_inbox_that_a_consumer_created_at_run_time(
    empty_engine: Engine,
) -> None:
    """Earlier releases' create_inbox_table made outbox_inbox without the migrations."""
    engine = empty_engine
    table.inbox.create(engine)  # what create_inbox_table did then
    with engine.begin() as connection:
        connection.execute(table.inbox.insert().values(consumer="billing", message_id="m-1"))

    migrate.upgrade(engine)

    assert _tables(engine) == OUTBOX_TABLES | {migrate.VERSION_TABLE}
    assert _diff(engine) == []
    with engine.connect() as connection:
        kept = connection.execute(select(table.inbox.c.consumer, table.inbox.c.message_id)).all()
    assert [tuple(row) for row in kept] == [("billing", "m-1")]
    migrate.downgrade(engine)
    assert _tables(engine) & OUTBOX_TABLES == set()


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


# --- Our revisions recorded in a service's alembic_version --------------------


def _recorded_by_the_service(
    engine: Engine, *, revision: str = HEAD, service_heads: tuple[str, ...] = ("svc_0001",)
) -> None:
    """Our tables at ``revision``, recorded as a service's Alembic history records them:
    in its ``alembic_version``, one row per branch, and no ``outbox_alembic_version``."""
    migrate.upgrade(engine, revision=revision)
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE {migrate.VERSION_TABLE} RENAME TO alembic_version"))
        connection.execute(
            text(
                "ALTER TABLE alembic_version "
                f"RENAME CONSTRAINT {migrate.VERSION_TABLE}_pkc TO alembic_version_pkc"
            )
        )
        for head in service_heads:
            connection.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": head})


def _service_versions(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _migrations_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.split()[1:2] == ["migrations"])


def test_every_revision_we_ship_is_named_as_ours(empty_sqlite_engine: Engine) -> None:
    """The prefix is how our row is told from the service's rows in alembic_version."""
    script = ScriptDirectory.from_config(migrate.alembic_config(empty_sqlite_engine))
    revisions = [s.revision for s in script.walk_revisions()]
    assert HEAD in revisions
    assert all(r.startswith(migrate.REVISION_PREFIX) for r in revisions)


def test_every_reader_finds_our_revision_among_the_service_heads(
    empty_pg_database: str, empty_pg_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_url(empty_pg_database)
    _recorded_by_the_service(empty_pg_engine, service_heads=("svc_0001", "svc_other_0001"))

    assert migrate.installed_revision(empty_pg_engine) == migrate.Installed(
        revision=HEAD, version_table="alembic_version"
    )
    assert migrate.current_revision(empty_pg_engine) == HEAD
    ready, detail = health.readiness(empty_pg_engine, cache_seconds=0)()
    assert ready, detail
    code, out, err = _cli(capsys, "status", "--json", "--database-url", url)
    assert code == 0, err
    assert json.loads(out)["schema_revision"] == HEAD
    _, out, _ = _cli(capsys, "check", "--database-url", url, "--broker-url", closed_port_url())
    line = _migrations_line(out)
    assert line.startswith("PASS") and f"schema at {HEAD}" in line, out


def test_outbox_migrate_at_our_head_in_the_service_history_changes_nothing(
    empty_pg_database: str, empty_pg_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    _recorded_by_the_service(empty_pg_engine)
    before = _tables(empty_pg_engine)

    code, out, err = _cli(capsys, "migrate", "--database-url", pg_url(empty_pg_database))

    assert code == 0, err
    assert out.strip() == f"outbox tables at revision {HEAD}"
    assert _tables(empty_pg_engine) == before  # no outbox_alembic_version
    assert _service_versions(empty_pg_engine) == {"svc_0001", HEAD}


def test_behind_head_in_the_service_history_every_reader_says_upgrade_there(
    empty_pg_database: str, empty_pg_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_url(empty_pg_database)
    _recorded_by_the_service(empty_pg_engine, revision="outbox_0001")
    before = _tables(empty_pg_engine)
    fix = "`alembic upgrade heads` in the service's Alembic project"

    ready, detail = health.readiness(empty_pg_engine, cache_seconds=0)()
    assert not ready
    assert detail == f"schema at revision outbox_0001, expected {HEAD}: run {fix}"
    _, out, _ = _cli(capsys, "check", "--database-url", url, "--broker-url", closed_port_url())
    line = _migrations_line(out)
    assert line.startswith("FAIL") and "schema at revision outbox_0001" in line, out
    assert fix in out

    code, _, err = _cli(capsys, "migrate", "--database-url", url)

    assert code == 1
    assert "recorded in alembic_version" in err and "`alembic upgrade heads`" in err, err
    assert "already exists" not in err
    assert _tables(empty_pg_engine) == before
    assert _service_versions(empty_pg_engine) == {"svc_0001", "outbox_0001"}


def test_outbox_migrate_never_creates_existing_tables_a_second_time(
    empty_pg_database: str, empty_pg_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service revision that depends on our head hides it: alembic_version holds only
    the service's row. Nothing can tell our revision then; migrate says why."""
    _recorded_by_the_service(empty_pg_engine)
    with empty_pg_engine.begin() as connection:
        connection.execute(text("DELETE FROM alembic_version WHERE version_num = :v"), {"v": HEAD})
    assert migrate.current_revision(empty_pg_engine) is None

    code, _, err = _cli(capsys, "migrate", "--database-url", pg_url(empty_pg_database))

    assert code == 1
    assert "the outbox tables exist" in err and 'depends_on = "outbox"' in err, err
    assert _service_versions(empty_pg_engine) == {"svc_0001"}


def test_a_role_that_cannot_read_the_service_version_table_is_told_so(
    empty_pg_database: str, empty_pg_engine: Engine
) -> None:
    _recorded_by_the_service(empty_pg_engine)
    role = f"outbox_reader_{uuid.uuid4().hex[:8]}"
    owner_url = pg_url(empty_pg_database)
    with psycopg.connect(owner_url, autocommit=True) as connection:
        connection.execute(f'CREATE ROLE "{role}" LOGIN')
        connection.execute(f'GRANT SELECT ON outbox_event, outbox_partition TO "{role}"')
    engine = create_outbox_engine(
        make_url(owner_url).set(username=role).render_as_string(hide_password=False)
    )
    try:
        ready, detail = health.readiness(engine, cache_seconds=0)()
    finally:
        engine.dispose()
        with psycopg.connect(owner_url, autocommit=True) as connection:
            connection.execute(f'DROP OWNED BY "{role}"')
            connection.execute(f'DROP ROLE "{role}"')
    assert not ready
    assert detail.startswith("cannot read alembic_version"), detail
    assert "GRANT SELECT ON alembic_version" in detail


# --- docs/quickstart.md, executed: a service project that includes our history ----------

# The docs' env.py says "in a real service: its models' Base.metadata": here, one table.
DOCS_METADATA_LINE = "service_metadata = MetaData()  # in a real service: its models' Base.metadata"
SERVICE_MODELS = """\
from sqlalchemy import Column, Integer, Table, Text

service_metadata = MetaData()
Table(
    "case",
    service_metadata,
    Column("tenant_id", Integer, primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("title", Text, nullable=False),
)"""


def service_blocks() -> dict[str, str]:
    """The blocks of docs/quickstart.md that set up a service's Alembic project."""
    blocks = [b for b in code_blocks("quickstart.md") if b.section == SERVICE_SECTION]
    assert [b.language for b in blocks] == ["bash", "ini", "python", "bash", "bash", "bash"]
    find_path, ini, env_py, upgrade, status, first_revision = (b.code for b in blocks)
    return {
        "find_path": find_path,
        "ini": ini,
        "env_py": env_py,
        "upgrade": upgrade,
        "status": status,
        "first_revision": first_revision,
    }


def _service_project(tmp_path: Path, ini: str, env_py: str, versions_path: Path, url: str) -> Path:
    """``alembic init``, then the docs' alembic.ini settings and env.py."""
    service = tmp_path / "service"
    service.mkdir()
    subprocess.run(
        [str(BIN / "alembic"), "init", "migrations"],
        cwd=service,
        capture_output=True,
        check=True,
        timeout=60,
    )
    generated = configparser.RawConfigParser()
    generated.read(service / "alembic.ini")
    documented = configparser.RawConfigParser()
    documented.read_string(ini.replace("/path/printed/above", str(versions_path)))
    for key, value in documented["alembic"].items():
        generated["alembic"][key] = value
    generated["alembic"]["sqlalchemy.url"] = url
    with (service / "alembic.ini").open("w") as file:
        generated.write(file)
    assert DOCS_METADATA_LINE in env_py
    (service / "migrations" / "env.py").write_text(
        env_py.replace(DOCS_METADATA_LINE, SERVICE_MODELS)
    )
    return service


def _script(service: Path) -> ScriptDirectory:
    return ScriptDirectory.from_config(AlembicConfig(str(service / "alembic.ini")))


def _run_block(code: str, service: Path, env: dict[str, str]) -> list[tuple[list[str], str, str]]:
    """Each ``alembic`` / ``outbox`` command of a docs block, run in the service project."""
    results = []
    for line in code.splitlines():
        command = shlex.split(line, comments=True)
        if not command:
            continue
        assert command[0] in ("alembic", "outbox"), f"unexpected command in the docs: {line}"
        result = subprocess.run(
            [str(BIN / command[0]), *command[1:]],
            cwd=service,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{line}: {result.stderr}"
        results.append((command, result.stdout, result.stderr))
    return results


def _assert_readers_see_our_head(env: dict[str, str], url: str, amqp_url: str) -> None:
    """``outbox status``, ``outbox check`` and a running relay's ``/readyz``."""
    status = subprocess.run(
        [str(BIN / "outbox"), "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert f"schema revision     {HEAD}" in status.stdout.splitlines()
    check = subprocess.run(
        [str(BIN / "outbox"), "check"], env=env, capture_output=True, text=True, timeout=60
    )
    # Only the migrations line: the other checks are tested in tests/integration/ops/test_check.py.
    line = _migrations_line(check.stdout)
    assert line.startswith("PASS") and f"schema at {HEAD}" in line, check.stdout
    port = free_port()
    values = relay_values(
        database_url=url,
        broker_url=amqp_url,
        exchange=env["OUTBOX_EXCHANGE"],
        http_port=str(port),
    )
    with running_relay(values):
        wait_for(lambda: get(port, "/readyz")[0] != 0, what="the relay to serve /readyz")
        ready, body = get(port, "/readyz")
    assert ready == 200, body
    assert f"schema at {HEAD}" in json.loads(body)["detail"]


def test_a_service_alembic_history_includes_our_revisions(
    tmp_path: Path, empty_pg_database: str, amqp_url: str, exchange_name: str
) -> None:
    """Follows docs/quickstart.md exactly: its command, its alembic.ini, its env.py, its
    commands; then every reader of the revision sees ours, and the service's revisions work."""
    docs = service_blocks()
    # The documented one-liner finds the installed package's revisions.
    command = shlex.split(docs["find_path"])
    assert command[0] == "python"
    found = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=60, check=True
    )
    assert Path(found.stdout.strip(), "0001_outbox_tables.py").exists()
    # A copy of that folder: a wrong command must never write into the repository.
    versions_path = tmp_path / "outbox-versions"
    shutil.copytree(found.stdout.strip(), versions_path, ignore=shutil.ignore_patterns("__py*"))
    ours = sorted(p.name for p in versions_path.iterdir())
    url = pg_url(empty_pg_database).replace("postgresql://", "postgresql+psycopg://")
    service = _service_project(tmp_path, docs["ini"], docs["env_py"], versions_path, url)
    env = _env(OUTBOX_DATABASE_URL=url, OUTBOX_BROKER_URL=amqp_url, OUTBOX_EXCHANGE=exchange_name)
    engine = create_outbox_engine(url)
    try:
        [(upgrade, _, printed)] = _run_block(docs["upgrade"], service, env)
        assert upgrade == ["alembic", "upgrade", "heads"]
        # The logging of alembic.ini is set up: alembic says what it applies.
        assert "Running upgrade  -> outbox_0001" in printed, printed
        assert "Running upgrade outbox_0001 -> outbox_0002" in printed, printed
        assert f"Running upgrade outbox_0002 -> {HEAD}" in printed, printed
        assert _tables(engine) == OUTBOX_TABLES | {"alembic_version"}
        assert _service_versions(engine) == {HEAD}

        [(status, out, _)] = _run_block(docs["status"], service, env)
        assert status == ["outbox", "status"]
        assert f"schema revision     {HEAD}" in out.splitlines()
        _assert_readers_see_our_head(env, url, amqp_url)

        # The service's first revision, as documented: autogenerated from its metadata.
        revision, upgrade_again = _run_block(docs["first_revision"], service, env)
        assert revision[0][:2] == ["alembic", "revision"]
        assert upgrade_again[0] == ["alembic", "upgrade", "heads"]
        # A branch of its own, in the service's folder; our folder is untouched.
        assert sorted(p.name for p in versions_path.iterdir()) == ours
        first = _script(service).get_revision("service@head")
        assert first is not None and first.down_revision is None
        assert first.branch_labels == {"service"}
        assert Path(first.path).parent == service / "migrations" / "versions"
        source = Path(first.path).read_text()
        assert "create_table('case'" in source
        assert "outbox_" not in source  # autogenerate knows our tables: no drop proposed
        assert _tables(engine) == OUTBOX_TABLES | {"case", "alembic_version"}
        assert _service_versions(engine) == {first.revision, HEAD}

        # A later revision, as the prose says: on the service's branch, depending on ours.
        page = (ROOT / "docs" / "quickstart.md").read_text()
        assert "--head service@head" in page and "--depends-on outbox" in page
        _run_block(
            'alembic revision --head service@head --depends-on outbox -m "needs outbox"\n'
            "alembic upgrade heads",
            service,
            env,
        )
        later = _script(service).get_revision("service@head")
        assert later is not None and later.down_revision == first.revision
        assert Path(later.path).parent == service / "migrations" / "versions"
        # Ours stays recorded next to the service's new head: every reader still sees it.
        assert _service_versions(engine) == {later.revision, HEAD}
        _assert_readers_see_our_head(env, url, amqp_url)
        # Our tables are exactly the metadata; the only other table is the service's.
        diff = _diff(engine)
        assert [d[1].name for d in diff] == ["case"]
        assert {d[0] for d in diff} == {"remove_table"}
    finally:
        engine.dispose()


def test_the_relay_role_is_granted_and_checked_on_the_service_version_table(
    empty_pg_database: str, empty_pg_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grant-relay-role` and the permissions line of `check` follow the revision to
    alembic_version: a relay role so granted passes check (and reads the revision)."""
    _recorded_by_the_service(empty_pg_engine)
    role = f"outbox_relay_{uuid.uuid4().hex[:8]}"
    owner_url = pg_url(empty_pg_database)
    with psycopg.connect(owner_url, autocommit=True) as connection:
        connection.execute(f'CREATE ROLE "{role}" LOGIN')
    relay_url = make_url(owner_url).set(username=role).render_as_string(hide_password=False)
    try:
        code, _, err = _cli(capsys, "grant-relay-role", role, "--database-url", owner_url)
        assert code == 0, err
        _, out, _ = _cli(
            capsys, "check", "--database-url", relay_url, "--broker-url", closed_port_url()
        )
        permissions = next(
            line for line in out.splitlines() if line.split()[1:2] == ["permissions"]
        )
        assert permissions.startswith("PASS"), out
        assert _migrations_line(out).startswith("PASS"), out
    finally:
        with psycopg.connect(owner_url, autocommit=True) as connection:
            connection.execute(f'DROP OWNED BY "{role}"')
            connection.execute(f'DROP ROLE "{role}"')
