"""A throwaway 3-node RabbitMQ cluster beside the shared broker, and what the suite does to it.

Each node is a ``rabbitmq-server`` of its own: name ``outbox-cN@localhost``,
AMQP port 568N, distribution port 2568N, data, logs, pid file and config under
one temporary directory, no plugins (so no management API), and an Erlang
cookie of its own (``HOME`` points into the directory: the shared broker's
cookie in /var/lib/rabbitmq is never read). ``rabbitmqctl`` is the one in
/usr/lib/rabbitmq/bin, not the /usr/sbin wrapper, which would switch to the
rabbitmq user and its cookie. The shared broker on 5672 is never touched.

Processes are started in sessions of their own and stopped by the PIDs this
harness started: the script's process group and the Erlang VM it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
COOKIE = "OUTBOXCLUSTERSUITECOOKIE"
USER, PASSWORD = "guest", "guest"


class RabbitNode:
    """One node of the test cluster; restartable with the same data (it rejoins)."""

    def __init__(self, index: int, base: Path) -> None:
        self.index = index
        self.name = f"outbox-c{index}@localhost"
        self.port = 5680 + index
        self.dist_port = 25680 + index
        self.dir = base / f"c{index}"
        self.home = self.dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(COOKIE)
            cookie.chmod(0o400)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            # A quorum queue's members on one machine: elections in 0.1-0.6 s.
            "log.file.level = info\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (NODENAME=rabbit@...)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.vm_pid: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}//"

    def start(self) -> None:
        if _listening(self.port):
            raise RuntimeError(f"port {self.port} is taken: not starting {self.name} on it")
        (self.dir / "pid").unlink(missing_ok=True)
        with (self.dir / "server.out").open("ab") as out:
            self.process = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.vm_pid = None

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.dir / 'server.out'}")
            if _listening(self.port):
                self.vm_pid = int((self.dir / "pid").read_text().strip())
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not listen on {self.port} in {timeout} s")

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        result = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name}: {result.stderr}")
        return result.stdout

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9 of the Erlang VM: no shutdown, the kernel resets its connections."""
        if self.vm_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.vm_pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(20)
        self.vm_pid = None

    def signal(self, signum: int) -> None:
        if self.vm_pid is not None:
            os.kill(self.vm_pid, signum)

    def stop(self) -> None:
        """Teardown: the VM and the script's process group, by the PIDs started here."""
        if self.process is None:
            return
        if self.vm_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.vm_pid, signal.SIGCONT)  # a paused node cannot stop
        self.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Cluster:
    nodes: list[RabbitNode]
    base: Path
    formed_in: float = 0.0
    events: list[str] = field(default_factory=list)

    @property
    def url_list(self) -> str:
        return ";".join(n.url for n in self.nodes)

    def node(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.name == name)

    def any_running(self, but: RabbitNode | None = None) -> RabbitNode:
        return next(n for n in self.nodes if n.alive() and n is not but)

    def leader(self, queue: str, via: RabbitNode | None = None) -> RabbitNode:
        """The node leading quorum queue ``queue`` (asked on a running node)."""
        node = via or self.any_running()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = node.ctl("list_queues", "--no-table-headers", "name", "leader", check=False)
            for line in out.splitlines():
                name, _, leader = line.partition("\t")
                if name == queue and leader.strip() in {n.name for n in self.nodes}:
                    return self.node(leader.strip())
            time.sleep(0.2)
        raise TimeoutError(f"no leader for {queue}")

    def restart(self, node: RabbitNode) -> float:
        """Start ``node`` again with its data; returns seconds until it runs and is clustered."""
        started = time.monotonic()
        node.start()
        node.wait_listening(120)
        node.ctl("await_startup", timeout=120)
        return time.monotonic() - started


@contextlib.contextmanager
def cluster_of_three(base: Path) -> Iterator[Cluster]:
    nodes = [RabbitNode(i, base) for i in (1, 2, 3)]
    started = time.monotonic()
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_listening(120)
            node.ctl("await_startup", timeout=120)
        first = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name, timeout=120)
            node.ctl("start_app", timeout=120)
        status = first.ctl("cluster_status", "--formatter", "json")
        running = set(json.loads(status)["running_nodes"])
        assert running == {n.name for n in nodes}, f"cluster did not form: {status}"
        yield Cluster(nodes=nodes, base=base, formed_in=time.monotonic() - started)
    finally:
        for node in nodes:
            node.stop()


def relay_node(pid: int, cluster: Cluster) -> RabbitNode | None:
    """The node process ``pid`` holds its AMQP connection to (None: none right now)."""
    from tests.faults.harness import established_sockets

    on = [n for n in cluster.nodes if established_sockets(pid, n.port)]
    return on[0] if len(on) == 1 else None


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)
