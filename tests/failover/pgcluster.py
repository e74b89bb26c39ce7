"""Throwaway PostgreSQL clusters: a primary, a streaming standby, crashes and promotions.

Each node is a data directory under a temporary directory owned by the
``postgres`` OS user (PostgreSQL refuses to run as root, so the binaries run
as that user when the suite runs as root), listening on 127.0.0.1 only, with
its unix socket in the temporary directory and trust authentication. Nodes
are stopped by the postmaster PIDs they started, never by name, so the shared
server on 5432 is never touched.

``fsync = off``: the suite crashes the server (``pg_ctl -m immediate``), not
the machine; what a process crash keeps is what was written to the kernel,
which fsync does not change, and the suite runs faster on a shared 2-core box.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

BIN = Path(os.environ.get("OUTBOX_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PRIMARY_PORT = 5441
STANDBY_PORT = 5442
DATABASE = "outbox_failover"
OS_USER = "postgres"
SLOT = "failover_standby"

_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    "hot_standby": "on",
    "fsync": "off",
    "shared_buffers": "'32MB'",
    "max_connections": "60",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


def available() -> str | None:
    """Why the suite cannot run here (None when it can)."""
    for tool in ("initdb", "pg_ctl", "pg_basebackup", "postgres"):
        if not (BIN / tool).exists():
            return f"needs {BIN / tool} (set OUTBOX_TEST_PG_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runs PostgreSQL as the postgres user: needs runuser"
    return None


def _command(args: Sequence[str]) -> list[str]:
    # As root, run as the postgres user: the server refuses to run as root.
    return ["runuser", "-u", OS_USER, "--", *args] if os.geteuid() == 0 else list(args)


def run_as_postgres(args: Sequence[str], *, timeout: float = 120) -> str:
    result = subprocess.run(_command(args), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _alive(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is still the postmaster of ``data_dir`` (not a zombie, not reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and str(data_dir).encode() in cmdline


class Node:
    """One PostgreSQL server (primary or standby) in a data directory of its own."""

    def __init__(self, name: str, port: int, base: Path) -> None:
        self.name = name
        self.port = port
        self.base = base
        self.data_dir = base / name
        self.log_path = base / f"{name}.log"
        self.pids: list[int] = []  # every postmaster this node started, for teardown
        self.held: list[int] = []  # server processes stopped by SIGSTOP

    # -- addresses --

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = DATABASE) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=3"

    def connect(self, database: str = DATABASE) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo(database), autocommit=True)

    def query(self, sql: str, params: Sequence[Any] = (), database: str = DATABASE) -> list[Any]:
        with self.connect(database) as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = (), database: str = DATABASE) -> None:
        with self.connect(database) as conn:
            conn.execute(sql, params)

    # -- setup --

    def init(self, **settings: str) -> None:
        run_as_postgres(
            [
                str(BIN / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        sockets = f"'{self.base}'"
        self.configure(**_SETTINGS, unix_socket_directories=sockets, port=str(self.port))
        self.configure(**settings)

    def configure(self, **settings: str) -> None:
        """Append ``settings`` to postgresql.conf (the last occurrence wins)."""
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# outbox failover suite\n")
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")

    def base_backup_of(self, primary: Node) -> None:
        """This node as a streaming standby of ``primary`` (pg_basebackup -R, a slot)."""
        run_as_postgres(
            [
                str(BIN / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-D",
                str(self.data_dir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-C",
                "-S",
                SLOT,
                "--no-sync",
            ]
        )
        self.configure(port=str(self.port))

    # -- life cycle --

    def start(self) -> None:
        run_as_postgres(self._pg_ctl("-l", str(self.log_path), "-w", "-t", "120", "start"))
        pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        self.pids.append(pid)

    def _pg_ctl(self, *args: str) -> list[str]:
        return [str(BIN / "pg_ctl"), "-D", str(self.data_dir), *args]

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def running(self) -> bool:
        return bool(self.pids) and _alive(self.pid, self.data_dir)

    def crash(self) -> None:
        """``pg_ctl -m immediate stop``: no checkpoint, no wait for the WAL writer."""
        run_as_postgres(self._pg_ctl("-m", "immediate", "stop"))
        self._wait_gone(self.pid)

    def stop(self) -> None:
        run_as_postgres(self._pg_ctl("-m", "fast", "stop"))
        self._wait_gone(self.pid)

    def hold_walsender(self) -> int:
        """SIGSTOP the WAL sender: from now on the standby receives nothing (it lags)."""
        rows = self.query("SELECT pid FROM pg_stat_replication", database="postgres")
        assert len(rows) == 1, f"expected one WAL sender, found {rows}"
        pid = int(rows[0][0])
        self.held.append(pid)
        os.kill(pid, signal.SIGSTOP)
        return pid

    def crash_holding_walsender(self) -> None:
        """Crash while the WAL sender is held: WAL it did not send never reaches the standby."""
        run_as_postgres(self._pg_ctl("-m", "immediate", "-W", "stop"))
        # A stopped process ignores SIGQUIT until continued; continued, it
        # would send some WAL first. SIGKILL ends it where it stands.
        for pid in self.held:
            os.kill(pid, signal.SIGKILL)
        self.held.clear()
        self._wait_gone(self.pid)

    def promote(self) -> None:
        run_as_postgres(self._pg_ctl("-w", "promote"))

    def _wait_gone(self, pid: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while _alive(pid, self.data_dir):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: postmaster {pid} still running")
            time.sleep(0.01)

    def teardown(self) -> None:
        """Stop every postmaster this node started that still runs; kill it if it must."""
        for pid in self.held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # stopped, it would never exit
        for pid in self.pids:
            if not _alive(pid, self.data_dir):
                continue
            subprocess.run(
                _command(self._pg_ctl("-m", "immediate", "stop")),
                capture_output=True,
                timeout=60,
            )
            deadline = time.monotonic() + 10
            while _alive(pid, self.data_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid, self.data_dir):
                os.kill(pid, signal.SIGKILL)  # its backends exit when they see it gone

    # -- replication --

    def lsn(self) -> str:
        return str(self.query("SELECT pg_current_wal_lsn()::text", database="postgres")[0][0])


class Cluster:
    """A primary and, optionally, a streaming standby; torn down by their PIDs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.primary = Node("primary", PRIMARY_PORT, base)
        self.standby = Node("standby", STANDBY_PORT, base)

    def nodes(self) -> list[Node]:
        return [self.primary, self.standby]

    def multi_host_url(self, database: str = DATABASE, *, password: str | None = None) -> str:
        """Both nodes, the writable one chosen by libpq (SQLAlchemy's repeated-host form)."""
        user = "postgres" if password is None else f"postgres:{password}"
        return (
            f"postgresql+psycopg://{user}@/{database}"
            f"?host=127.0.0.1:{self.primary.port}&host=127.0.0.1:{self.standby.port}"
            "&target_session_attrs=read-write&connect_timeout=3"
        )

    def create_primary(self, **settings: str) -> None:
        self.primary.init(**settings)
        self.primary.start()
        self.primary.execute(f'CREATE DATABASE "{DATABASE}"', database="postgres")

    def create_standby(self) -> None:
        self.standby.base_backup_of(self.primary)
        self.standby.start()
        self.wait_streaming()

    def wait_streaming(self, *, sync: bool = False, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        wanted = "sync" if sync else None
        while time.monotonic() < deadline:
            rows = self.primary.query(
                "SELECT state, sync_state FROM pg_stat_replication", database="postgres"
            )
            if any(
                state == "streaming" and wanted in (None, sync_state) for state, sync_state in rows
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"the standby is not streaming{' synchronously' if sync else ''}")

    def make_synchronous(self) -> None:
        """Commits on the primary wait until the standby has flushed their WAL."""
        with self.primary.connect("postgres") as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        self.wait_streaming(sync=True)

    def replication_lag(self) -> tuple[str, str | None]:
        """(the primary's current LSN, the standby's replay LSN as the primary saw it)."""
        rows = self.primary.query(
            "SELECT pg_current_wal_lsn()::text, (SELECT replay_lsn::text FROM pg_stat_replication"
            " LIMIT 1)",
            database="postgres",
        )
        return str(rows[0][0]), rows[0][1]

    def teardown(self) -> None:
        for node in self.nodes():
            node.teardown()


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A temporary directory owned by ``postgres`` and the cluster in it, always torn down."""
    base = Path(tempfile.mkdtemp(prefix="outbox-failover-"))
    if os.geteuid() == 0:
        shutil.chown(base, OS_USER, OS_USER)
    base.chmod(0o755)  # the test reads the server logs
    cluster = Cluster(base)
    try:
        yield cluster
    finally:
        cluster.teardown()
        shutil.rmtree(base, ignore_errors=True)
