"""What wakes the relay: :class:`Wakeup` (new rows may exist) and :class:`Bell`.

The relay waits for whichever comes first: the broker's confirms on its
socket, a database thread finishing a job, or a NOTIFY. The last two come
from other threads; a bell (a self-pipe) turns them into a descriptor that
``select`` waits on beside the socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref


class Bell:
    """A descriptor that ``select`` sees readable once rung, until cleared."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._rung = False
        # Ring and clear from different threads must not lose a ring: without
        # it, a clear could drain the byte of a ring that set _rung after it.
        self._lock = threading.Lock()
        self._close = weakref.finalize(self, _close_both, self._reader, self._writer)

    def ring(self) -> None:
        with self._lock:
            if self._rung:
                return
            self._rung = True
            with contextlib.suppress(OSError):  # closed: nobody waits any more
                self._writer.send(b"\0")

    def clear(self) -> None:
        with self._lock:
            if not self._rung:
                return
            self._rung = False
            with contextlib.suppress(OSError):  # BlockingIOError: drained
                while self._reader.recv(64):
                    pass

    @property
    def rung(self) -> bool:
        return self._rung

    def fileno(self) -> int:
        return self._reader.fileno()

    def close(self) -> None:
        self._close()


def _close_both(reader: socket.socket, writer: socket.socket) -> None:
    reader.close()
    writer.close()


class Wakeup:
    """Set when new work may exist (a NOTIFY); the loop also polls without it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._bell = Bell()

    def set(self) -> None:
        self._event.set()
        self._bell.ring()

    def clear(self) -> None:
        self._event.clear()
        self._bell.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def fileno(self) -> int:
        """Readable while set: the relay waits on it beside the broker's socket."""
        return self._bell.fileno()
