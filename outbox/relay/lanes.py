"""Messages waiting to be sent: one lane per ordering key, at most one message of a key out.

A message is *out* from the moment it is taken for sending until its verdict
arrives. A key with a message out sends nothing else: whatever the broker
then does to that message (nack, return, refusal, timeout, lost connection),
nothing later of its key is on the wire behind it, so first arrivals of a key
are in commit order. Messages of different keys go out side by side, as many
as the window allows.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from outbox.relay.message import OutgoingMessage


class Lanes:
    """Per-key FIFO lanes of prepared messages, and the messages out."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[OutgoingMessage]] = {}
        # Keys whose head may go out now (a lane, nothing out), oldest first.
        self._ready: OrderedDict[str, None] = OrderedDict()
        # Out, by position, in the order taken: (message, monotonic time taken).
        self._out: OrderedDict[int, tuple[OutgoingMessage, float]] = OrderedDict()
        # Key -> the position of its message out.
        self._busy: dict[str, int] = {}
        self.queued = 0

    @property
    def out(self) -> int:
        return len(self._out)

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def __bool__(self) -> bool:
        return bool(self.queued or self._out)

    def add(self, message: OutgoingMessage) -> None:
        """Append ``message`` to its key's lane (callers add a key's rows in position order)."""
        key = message.ordering_key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = deque()
            if key not in self._busy:
                self._ready[key] = None
        lane.append(message)
        self.queued += 1

    def take(self, limit: int, now: float) -> list[OutgoingMessage]:
        """The heads of up to ``limit`` ready keys, now out."""
        taken: list[OutgoingMessage] = []
        ready, lanes, busy, out = self._ready, self._lanes, self._busy, self._out
        while ready and len(taken) < limit:
            key, _ = ready.popitem(last=False)
            lane = lanes[key]
            message = lane.popleft()
            if not lane:
                del lanes[key]
            busy[key] = message.position
            out[message.position] = (message, now)
            taken.append(message)
        self.queued -= len(taken)
        return taken

    def take_key(self, key: str, now: float) -> OutgoingMessage | None:
        """The head of ``key`` alone, now out; None if the key is not ready."""
        if key not in self._ready:
            return None
        self._ready.move_to_end(key, last=False)
        return self.take(1, now)[0]

    def head(self, key: str) -> OutgoingMessage | None:
        lane = self._lanes.get(key)
        return lane[0] if lane else None

    def _release(self, message: OutgoingMessage) -> bool:
        """``message`` is no longer out, nor its key busy; False if it was not out."""
        if self._out.pop(message.position, None) is None:
            return False
        if self._busy.get(message.ordering_key) == message.position:
            del self._busy[message.ordering_key]
        return True

    def done(self, message: OutgoingMessage) -> None:
        """``message`` is settled for good (confirmed, or dead): its key may go on."""
        key = message.ordering_key
        if self._release(message) and key in self._lanes and key not in self._busy:
            self._ready[key] = None

    def put_back(self, message: OutgoingMessage) -> None:
        """``message`` was not confirmed: it heads its lane again, and goes first."""
        if not self._release(message):
            return
        key = message.ordering_key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = deque()
        lane.appendleft(message)
        self.queued += 1
        self._ready[key] = None
        self._ready.move_to_end(key, last=False)

    def drop(self, key: str) -> None:
        """Forget ``key``'s lane (its rows are fetched again later, in order)."""
        lane = self._lanes.pop(key, None)
        if lane is not None:
            self.queued -= len(lane)
        self._ready.pop(key, None)

    def clear(self) -> None:
        """Forget every lane; messages out stay out until their verdicts arrive."""
        self._lanes.clear()
        self._ready.clear()
        self.queued = 0

    def forget_out(self) -> None:
        """Forget the messages out too: no verdict will come for them (their rows are refetched)."""
        self._out.clear()
        self._busy.clear()

    def oldest_out(self) -> float | None:
        """When the oldest message out was taken; None with nothing out."""
        for _, taken_at in self._out.values():
            return taken_at
        return None

    def positions(self) -> Iterator[int]:
        """Every position queued or out (the fetch leaves them out)."""
        yield from self._out
        for lane in self._lanes.values():
            for message in lane:
                yield message.position

    def keys(self) -> set[str]:
        return set(self._lanes)
