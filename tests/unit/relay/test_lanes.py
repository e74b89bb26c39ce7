"""Lanes: never two messages of one key out, and each key's messages go out in order.

A state machine drives the lanes the way the relay does (fetches add rows in
position order, the window takes heads, verdicts confirm, put back or kill
them, keys get dropped and refetched, everything gets cleared) and checks
after every step what the order guarantee rests on.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from outbox.relay.lanes import Lanes
from outbox.relay.message import OutgoingMessage

KEYS = ("a", "b", "c", "d")


def _message(position: int, key: str) -> OutgoingMessage:
    return OutgoingMessage(
        position=position,
        message_id=f"m{position}",
        routing_key="case.update",
        body=b"{}",
        content_type="application/json",
        timestamp=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        headers={"outbox-key": key},
        ordering_key=key,
    )


class LanesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lanes = Lanes()
        self.positions = itertools.count(1)
        # The table, as the relay sees it: pending positions per key, in order.
        self.pending: dict[str, list[int]] = defaultdict(list)
        self.confirmed: dict[str, list[int]] = defaultdict(list)
        self.out: dict[int, OutgoingMessage] = {}
        self.now = 0.0

    def _fetchable(self) -> list[OutgoingMessage]:
        """What a fetch returns: pending rows not queued or out, per key in order."""
        known = set(self.lanes.positions())
        rows = [
            (position, key)
            for key, positions in self.pending.items()
            for position in positions
            if position not in known
        ]
        return [_message(p, k) for p, k in sorted(rows)]

    @rule(key=st.sampled_from(KEYS), count=st.integers(1, 4))
    def commit(self, key: str, count: int) -> None:
        self.pending[key] += [next(self.positions) for _ in range(count)]

    @rule()
    def fetch(self) -> None:
        # Only rows behind everything the lanes hold of the key (the relay's fetch
        # leaves out queued and out positions, and returns each key in order).
        for message in self._fetchable():
            self.lanes.add(message)

    @rule(limit=st.integers(1, 6))
    def take(self, limit: int) -> None:
        self.now += 1
        for message in self.lanes.take(limit, self.now):
            assert message.position not in self.out
            self.out[message.position] = message

    @precondition(lambda self: self.out)
    @rule(data=st.data(), verdict=st.sampled_from(["confirm", "put_back", "dead"]))
    def settle(self, data: st.DataObject, verdict: str) -> None:
        position = data.draw(st.sampled_from(sorted(self.out)))
        message = self.out.pop(position)
        key = message.ordering_key
        if verdict == "confirm":
            # The broker took it: the first pending row of its key, nothing earlier left.
            assert self.pending[key][0] == position, (key, self.pending[key], position)
            self.pending[key].pop(0)
            self.confirmed[key].append(position)
            self.lanes.done(message)
        elif verdict == "put_back":
            self.lanes.put_back(message)
        else:  # dead: the row holds its key; the relay drops the key's lane
            self.pending[key].clear()
            self.lanes.done(message)
            self.lanes.drop(key)

    @rule(key=st.sampled_from(KEYS))
    def drop(self, key: str) -> None:
        self.lanes.drop(key)

    @rule()
    def clear(self) -> None:
        self.lanes.clear()

    @invariant()
    def one_out_per_key(self) -> None:
        keys = [m.ordering_key for m in self.out.values()]
        assert len(keys) == len(set(keys))
        assert self.lanes.out == len(self.out)

    @invariant()
    def out_is_the_first_pending_row_of_its_key(self) -> None:
        for position, message in self.out.items():
            assert self.pending[message.ordering_key][0] == position

    @invariant()
    def queued_count_is_exact(self) -> None:
        assert self.lanes.queued == len(list(self.lanes.positions())) - self.lanes.out

    @invariant()
    def confirmations_are_in_commit_order(self) -> None:
        for positions in self.confirmed.values():
            assert positions == sorted(positions)


LanesMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_lanes_keep_per_key_order = LanesMachine.TestCase
