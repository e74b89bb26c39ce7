"""Test hosts of their own: network namespaces, and a PostgreSQL and a RabbitMQ they reach.

Each relay host is a network namespace (``outbox-h1``, ``outbox-h2``) joined to
the root namespace by a veth pair (``10.231.N.2`` inside, ``10.231.N.1`` outside).
The services listen on addresses of their own in the root namespace, held by a
veth pair that never leaves it (this kernel has no ``dummy`` links): PostgreSQL
on ``10.231.0.1:5451``, RabbitMQ on ``10.231.0.2:5691``. Because the two have
different addresses, a host can lose one and keep the other:

- ``drop``: packets to the address (leaving the host) and from it (leaving the
  root side) go to an htb class whose leaf is a zero-length pfifo: they vanish
  in the network, as in a real partition; nobody gets a reset or an ICMP error;
- ``unreachable``: a route in the host's namespace that refuses at once
  (``EHOSTUNREACH``), as when a router knows the network is gone;
- ``throttle``: the host's packets to the address leave at a limited rate,
  a slow link to the broker (see the tests for why).

This machine has neither iptables nor netem; htb, pfifo and u32 suffice.

The PostgreSQL 15 cluster and the RabbitMQ node are throwaway ones (data under a
temporary directory); the shared services on 5432 and 5672 are never touched.
Everything started is recorded with its PID in ``STATE_FILE``, so that a later
run cleans up after one that crashed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import psycopg

SUBNET = "10.231.0.0/16"
PG_ADDRESS = "10.231.0.1"
BROKER_ADDRESS = "10.231.0.2"
PG_PORT = 5451
BROKER_PORT = 5691
DIST_PORT = 25691
NODE = "outbox-h@localhost"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The scripts themselves: the wrappers in /usr/sbin switch to the rabbitmq user,
# which loses this node's HOME and so its cookie.
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
NAMESPACE_PREFIX = "outbox-h"
LINK_PREFIX = "obh"  # every link this module creates starts with it
SERVICE_LINKS = ("obh-svc0", "obh-svc1")
STATE_FILE = Path(tempfile.gettempdir()) / "outbox-hosts-lab.json"


def run(*args: str, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def missing_tools() -> list[str]:
    tools = ["ip", "tc", "runuser", str(PG_BIN / "initdb"), str(RABBITMQ_SERVER), str(RABBITMQCTL)]
    return [tool for tool in tools if shutil.which(tool) is None]


# -- what a run leaves behind ----------------------------------------------------


def _remember(kind: str, pid: int, marker: str, directory: Path | None = None) -> None:
    state = _state()
    state.append({"kind": kind, "pid": pid, "marker": marker, "dir": str(directory or "")})
    STATE_FILE.write_text(json.dumps(state))


def _state() -> list[dict[str, Any]]:
    try:
        return list(json.loads(STATE_FILE.read_text()))
    except (OSError, ValueError):
        return []


def broker_bytes_from(host: Host) -> dict[int, int]:
    """What the broker's sockets received from ``host``, per connection (its port: bytes).

    The kernel's count on the broker's side (``ss -i``, ``bytes_received``),
    read in milliseconds; ``rabbitmqctl list_connections recv_oct`` has the
    same number but takes more than a second to start.
    """
    out = run("ss", "-Htin", "state", "established", f"( sport = :{BROKER_PORT} )")
    received: dict[int, int] = {}
    peer: int | None = None
    for line in out.splitlines():
        if not line[:1].isspace():
            fields = line.split()
            address, _, port = fields[-1].rpartition(":")
            peer = int(port) if address == host.address else None
        elif peer is not None:
            for item in line.split():
                if item.startswith("bytes_received:"):
                    received[peer] = int(item.split(":")[1])
    return received


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_pid(pid: int, *, marker: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, process ``pid`` if it is still the one we started."""
    if marker not in _cmdline(pid):
        return  # gone, or the PID was reused by someone else's process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and marker in _cmdline(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        time.sleep(0.05)
    if marker in _cmdline(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def clean_leftovers() -> None:
    """What a crashed earlier run left: its processes (by recorded PID), links, namespaces."""
    for entry in _state():
        kill_pid(int(entry["pid"]), marker=str(entry["marker"]), grace=5)
        if entry["dir"]:
            shutil.rmtree(entry["dir"], ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    for namespace in run("ip", "netns", "list").split():
        if namespace.startswith(NAMESPACE_PREFIX):
            run("ip", "netns", "delete", namespace, check=False)
    for line in run("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(LINK_PREFIX):
            run("ip", "link", "delete", name, check=False)


# -- the network -----------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    index: int

    @property
    def namespace(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.index}"

    @property
    def root_link(self) -> str:
        return f"{LINK_PREFIX}{self.index}-r"

    @property
    def host_link(self) -> str:
        return f"{LINK_PREFIX}{self.index}-n"

    @property
    def gateway(self) -> str:
        return f"10.231.{self.index}.1"

    @property
    def address(self) -> str:
        return f"10.231.{self.index}.2"

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command on this host (``ip netns exec`` execs it: the PID is the command's)."""
        return ("ip", "netns", "exec", self.namespace)


class Network:
    """The test hosts and their links; partitions and slow links between them and the services."""

    def __init__(self, count: int) -> None:
        self.hosts = [Host(i) for i in range(1, count + 1)]
        self._unreachable: dict[Host, set[str]] = {host: set() for host in self.hosts}
        self._trees: set[tuple[str, ...]] = set()  # (tc command..., link): has an htb tree
        self._classes = 0

    def create(self) -> None:
        svc0, svc1 = SERVICE_LINKS
        run("ip", "link", "add", svc0, "type", "veth", "peer", "name", svc1)
        for address in (PG_ADDRESS, BROKER_ADDRESS):
            run("ip", "addr", "add", f"{address}/32", "dev", svc0)
        run("ip", "link", "set", svc0, "up")
        run("ip", "link", "set", svc1, "up")
        for host in self.hosts:
            run("ip", "netns", "add", host.namespace)
            run("ip", "link", "add", host.root_link, "type", "veth", "peer", "name", host.host_link)
            run("ip", "link", "set", host.host_link, "netns", host.namespace)
            run("ip", "addr", "add", f"{host.gateway}/30", "dev", host.root_link)
            run("ip", "link", "set", host.root_link, "up")
            inside = ("ip", "-n", host.namespace)
            run(*inside, "addr", "add", f"{host.address}/30", "dev", host.host_link)
            run(*inside, "link", "set", host.host_link, "up")
            run(*inside, "link", "set", "lo", "up")
            run(*inside, "route", "add", "10.231.0.0/24", "via", host.gateway)

    def destroy(self) -> None:
        for host in self.hosts:
            run("ip", "netns", "delete", host.namespace, check=False)  # takes its veth pair along
            run("ip", "link", "delete", host.root_link, check=False)
        run("ip", "link", "delete", SERVICE_LINKS[0], check=False)

    def prepare(self, host: Host) -> None:
        """Put the (empty) htb trees in place, so that a later cut is one filter per side."""
        self._tree(("tc", "-n", host.namespace), host.host_link)
        self._tree(("tc",), host.root_link)

    def cut(self, host: Host, address: str, *, how: str = "drop") -> None:
        """Cut ``host`` off from ``address`` (``drop``: silently; ``unreachable``: refused).

        ``drop`` takes both directions: the host's packets to the address and
        the address's packets to the host (a server's retransmissions, its
        keepalives) vanish alike.
        """
        if how == "unreachable":
            self._unreachable[host].add(address)
            run("ip", "-n", host.namespace, "route", "add", "unreachable", f"{address}/32")
            return
        if how != "drop":
            raise ValueError(how)
        self.prepare(host)
        # Lower prio numbers are tried first: the cut wins over a slow link.
        match = "parent 1: protocol ip prio 1 u32 match ip"
        run("tc", "-n", host.namespace, "filter", "add", "dev", host.host_link,
            *f"{match} dst {address}/32 flowid 1:2".split())  # fmt: skip
        run("tc", "filter", "add", "dev", host.root_link,
            *f"{match} src {address}/32 flowid 1:2".split())  # fmt: skip

    def throttle(self, host: Host, address: str, rate: str) -> None:
        """Let ``host``'s packets to ``address`` leave at ``rate`` (tc units, e.g. ``400kbit``)."""
        tc = ("tc", "-n", host.namespace)
        link = host.host_link
        self._tree(tc, link)
        self._classes += 1
        classid = f"1:{10 + self._classes}"
        run(*tc, *f"class add dev {link} parent 1: classid {classid} htb rate {rate}".split())
        match = f"parent 1: protocol ip prio 2 u32 match ip dst {address}/32"
        run(*tc, "filter", "add", "dev", link, *f"{match} flowid {classid}".split())

    def heal(self, host: Host) -> None:
        """Every cut and slow link of ``host`` gone."""
        for address in self._unreachable[host]:
            run("ip", "-n", host.namespace, "route", "delete", "unreachable", f"{address}/32")
        self._unreachable[host] = set()
        for tc, link in ((("tc", "-n", host.namespace), host.host_link), (("tc",), host.root_link)):
            if (*tc, link) in self._trees:
                run(*tc, "qdisc", "del", "dev", link, "root")
                self._trees.discard((*tc, link))

    def _tree(self, tc: tuple[str, ...], link: str) -> None:
        """An htb tree on ``link``'s egress: 1:1 everything else, 1:2 a black hole.

        The black hole is a zero-length pfifo: whatever is classified into it is
        dropped, without a reset or an ICMP error (no filter action needed; this
        kernel has none).
        """
        if (*tc, link) in self._trees:
            return
        for command in (
            f"qdisc add dev {link} root handle 1: htb default 1",
            f"class add dev {link} parent 1: classid 1:1 htb rate 10gbit",
            f"class add dev {link} parent 1: classid 1:2 htb rate 10gbit",
            f"qdisc add dev {link} parent 1:2 handle 20: pfifo limit 0",
        ):
            run(*tc, *command.split())
        self._trees.add((*tc, link))


# -- PostgreSQL ------------------------------------------------------------------


class PgCluster:
    """A throwaway PostgreSQL 15 cluster, run as the ``postgres`` OS user."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.pid: int | None = None

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{PG_PORT}/{database}"

    def url_from_hosts(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{PG_ADDRESS}:{PG_PORT}/{database}"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir()
        shutil.chown(self.base, "postgres")
        shutil.chown(self.sockets, "postgres")
        as_postgres = ("runuser", "-u", "postgres", "--")
        initdb = (str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust")
        run(*as_postgres, *initdb, "--no-sync")
        settings = {
            "listen_addresses": f"'{PG_ADDRESS},127.0.0.1'",
            "port": str(PG_PORT),
            "unix_socket_directories": f"'{self.sockets}'",
            # Throwaway: nothing here survives the run, and the machine's two cores are shared.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "100",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {SUBNET} trust\n")
        pg_ctl = (str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "pg.log"))
        run(*as_postgres, *pg_ctl, "-w", "-t", "60", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        _remember("postgres", self.pid, str(self.data), self.base)

    def stop(self) -> None:
        if self.pid is not None:
            # SIGTERM to the postmaster: a smart shutdown would wait for clients; SIGINT is fast.
            with contextlib.suppress(ProcessLookupError):
                if str(self.data) in _cmdline(self.pid):
                    os.kill(self.pid, signal.SIGINT)
            kill_pid(self.pid, marker=str(self.data), grace=15)
            self.pid = None

    def create_database(self, name: str, template: str | None = None) -> None:
        clause = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{clause}')


# -- RabbitMQ ----------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of its own (name, ports, cookie, data), listening on BROKER_ADDRESS."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.process: subprocess.Popen[bytes] | None = None
        self.beam_pid: int | None = None
        home = base / "home"
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_PORT": str(BROKER_PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
        }
        self.amqp_url = f"amqp://guest:guest@{BROKER_ADDRESS}:{BROKER_PORT}//"

    def start(self) -> None:
        home = self.base / "home"
        for directory in (home, self.base / "mnesia", self.base / "log"):
            directory.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(f"OUTBOXHOSTS{os.getpid()}")
        cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")  # no management plugin
        # guest may log in from the test hosts (loopback-only by default).
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {BROKER_ADDRESS}:{BROKER_PORT}\nloopback_users = none\n"
        )
        log = (self.base / "log" / "server.out").open("ab")
        self.process = subprocess.Popen(
            [str(RABBITMQ_SERVER)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _remember("rabbitmq-server", self.process.pid, str(RABBITMQ_SERVER))
        self.ctl("wait", "--timeout", "90", str(self.base / "rabbit.pid"), timeout=120)
        self.beam_pid = int((self.base / "rabbit.pid").read_text().strip())
        _remember("beam", self.beam_pid, NODE, self.base)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [str(RABBITMQCTL), "-q", "-n", NODE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        if self.process is None:
            return
        if self.beam_pid is not None:
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=30)
            kill_pid(self.beam_pid, marker=NODE, grace=10)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def declare(self, exchanges: Sequence[str], queues: Sequence[str]) -> None:
        """Topic exchanges and durable queues, each queue bound to every exchange (``#``)."""
        with _channel(self.amqp_url) as channel:
            for exchange in exchanges:
                channel.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
            for queue in queues:
                channel.queue_declare(queue, durable=True, auto_delete=False)
                for exchange in exchanges:
                    channel.queue_bind(queue, exchange, "#")


@contextlib.contextmanager
def _channel(url: str) -> Iterator[Any]:
    host, user, password = _parts(url)
    connection = amqp.Connection(host, userid=user, password=password)
    connection.connect()
    try:
        yield connection.channel()
    finally:
        connection.close()


def _parts(url: str) -> tuple[str, str, str]:
    rest = url.split("://", 1)[1].rstrip("/")
    credentials, host = rest.split("@", 1)
    user, password = credentials.split(":", 1)
    return host, user, password


# -- watching ------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    at: float  # wall clock (time.time()) when the consumer got it
    exchange: str  # the exchange it was published to: which relay sent it
    message_id: str


class Recorder:
    """Consumes a queue while the test runs and notes when each message came and from whom.

    Every relay publishes to an exchange of its own; RabbitMQ tells the consumer
    which exchange a delivery was published to, so each arrival names its relay
    (there is one publishing connection per relay).
    """

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.amqp_url = amqp_url
        self.queue = queue
        self.received: list[Received] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError(f"recorder did not start: {self.error}")

    def _run(self) -> None:
        try:
            host, user, password = _parts(self.amqp_url)
            connection = amqp.Connection(host, userid=user, password=password)
            connection.connect()
            channel = connection.channel()
            channel.basic_qos(0, 2000, False)

            def on_message(message: Any) -> None:
                self.received.append(
                    Received(
                        time.time(),
                        str(message.delivery_info["exchange"]),
                        str(message.properties.get("message_id")),
                    )
                )

            channel.basic_consume(self.queue, callback=on_message, no_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.2)
            connection.close()
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def stop(self, quiet: float = 1.0) -> None:
        """Stop once nothing arrived for ``quiet`` seconds."""
        count = -1
        while count != len(self.received):
            count = len(self.received)
            time.sleep(quiet)
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error

    def of(self, exchange: str) -> list[Received]:
        return [r for r in self.received if r.exchange == exchange]


@dataclass(frozen=True)
class Sample:
    at: float  # wall clock
    leases: dict[int, tuple[str, float, bool]]  # partition -> owner, expiry (wall clock), live

    def live(self, tag: str) -> set[int]:
        """The partitions an owner whose id contains ``tag`` holds by an unexpired lease."""
        return {p for p, (owner, _, live) in self.leases.items() if live and tag in owner}


class LeaseWatcher:
    """Samples ``outbox_partition`` every ``interval`` seconds from the root namespace."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url = url
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT partition, owner, lease_expires_at, lease_expires_at > now()"
                    " FROM outbox_partition WHERE owner IS NOT NULL"
                ).fetchall()
                leases = {int(p): (str(o), e.timestamp(), bool(live)) for p, o, e, live in rows}
                self.samples.append(Sample(time.time(), leases))
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def lease_end(self, pid: int, since: float, until: float) -> float:
        """When relay ``pid``'s leases ran out by the database: the latest expiry it held.

        Between ``since`` (it was cut off or frozen) and ``until`` it could not
        renew, so the expiries it had then are the last; a renewal sent just
        before ``since`` may still have landed, hence the maximum over the window.
        """
        tag = f":{pid}:"
        ends = [
            expiry
            for sample in self.samples
            if since <= sample.at <= until
            for owner, expiry, _ in sample.leases.values()
            if tag in owner
        ]
        if not ends:
            raise AssertionError(f"relay {pid} held no lease between the cut and the heal")
        return max(ends)

    def first(self, condition: Callable[[Sample], bool], since: float) -> float | None:
        """The first sample time at or after ``since`` when ``condition`` held."""
        return next((s.at for s in self.samples if s.at >= since and condition(s)), None)


def relay_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a relay's log, each with ``at`` (wall clock seconds) added."""
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        event["at"] = dt.datetime.fromisoformat(event["time"]).timestamp()
        events.append(event)
    return events
