"""A TCP forwarder to the shared broker that a test can shut, as a broker node that dies."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import kombu


class Gate:
    """A TCP forwarder to the broker that can be shut: then it drops and refuses connections."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.open = True
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()  # the AMQP handshake fails at once
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def shut(self) -> None:
        self.open = False
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.shut()
        self._listener.close()


def broker_url(amqp_url: str, port: int | None = None, scheme: str = "amqp") -> str:
    """The shared broker's URL with its credentials, on ``port`` (a gate's) if given."""
    parsed = kombu.Connection(amqp_url)
    host = "localhost" if scheme == "amqps" else parsed.hostname
    return f"{scheme}://{parsed.userid}:{parsed.password}@{host}:{port or parsed.port or 5672}//"


@contextlib.contextmanager
def gate_to(amqp_url: str) -> Iterator[Gate]:
    """A gate in front of the broker of ``amqp_url``, closed afterwards."""
    parsed = kombu.Connection(amqp_url)
    gate = Gate((parsed.hostname or "127.0.0.1", parsed.port or 5672))
    try:
        yield gate
    finally:
        gate.close()
