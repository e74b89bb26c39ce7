"""Where each event's latency went, from a traced relay's timeline (benchmarks.traced_relay).

Every event's path is cut at the moments the timeline and the two ends give:

    commit --(notify)--> NOTIFY seen --(loop)--> fetch starts --(fetch)--> fetch ends
           --(send)--> written to the broker --(broker)--> consumer has it

``notify``: PostgreSQL delivering NOTIFY to the relay's listener; ``loop``:
the relay turning to the database once woken (a busy loop, a rebalance or a
mark in the way); ``fetch``: the round trip that read the row; ``send``:
preparing and writing it; ``broker``: routing to the consumer. A slow event
is then blamed on its longest segment, and on whatever else ran during that
segment (a lease renewal, a scheduled job, a garbage collection, a log
record): the table says how often each cause held up the slowest events.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

SEGMENTS = ("notify", "loop", "fetch", "send", "broker")
# Spans that are not the event's own path but may stand in its way.
_BYSTANDERS = ("rebalance", "mark", "log", "gc", "job")


@dataclass(frozen=True)
class EventPath:
    latency_ms: float
    segments_ms: dict[str, float]
    blamed: str


def _paths(
    trace: dict[str, Any], committed: dict[str, float], received: dict[str, float]
) -> list[EventPath]:
    spans: list[tuple[str, float, float]] = [tuple(s) for s in trace["spans"]]
    fetches = sorted((start, end) for kind, start, end in spans if kind == "fetch")
    fetch_starts = [start for start, _ in fetches]
    notifies = sorted(start for kind, start, _ in spans if kind == "notify")
    others = [s for s in spans if s[0].split(":")[0].rstrip("012") in _BYSTANDERS]
    sent: dict[str, float] = trace["sent"]
    paths: list[EventPath] = []
    for event_id, commit in committed.items():
        arrival, written = received.get(event_id), sent.get(event_id)
        if arrival is None or written is None:
            continue
        # The fetch that read it: the last one to start before it was written.
        index = bisect.bisect_right(fetch_starts, written) - 1
        if index < 0:
            continue
        fetch_start, fetch_end = fetches[index]
        notify_index = bisect.bisect_left(notifies, commit)
        notified = notifies[notify_index] if notify_index < len(notifies) else fetch_start
        notified = min(max(notified, commit), fetch_start)
        cuts = [commit, notified, max(notified, fetch_start), fetch_end, written, arrival]
        segments = {
            name: max(0.0, (cuts[i + 1] - cuts[i]) * 1000) for i, name in enumerate(SEGMENTS)
        }
        longest = max(segments, key=segments.__getitem__)
        start_at = cuts[SEGMENTS.index(longest)]
        end_at = cuts[SEGMENTS.index(longest) + 1]
        in_the_way = [
            (min(end, end_at) - max(start, start_at), kind)
            for kind, start, end in others
            if start < end_at and end > start_at
        ]
        blamed = longest
        if in_the_way:
            blamed = f"{longest}, during {max(in_the_way)[1]}"
        paths.append(EventPath((arrival - commit) * 1000, segments, blamed))
    return paths


def report(
    trace: dict[str, Any],
    committed: dict[str, float],
    received: dict[str, float],
    *,
    slowest: float = 0.01,
) -> str:
    """A text table: median segments of all events and of the slowest ``slowest`` share,
    and what the slowest were blamed on."""
    paths = sorted(_paths(trace, committed, received), key=lambda p: p.latency_ms)
    if not paths:
        return "no event could be traced"
    slow = paths[-max(1, int(len(paths) * slowest)) :]
    lines = [
        f"latency attribution: {len(paths)} events traced, the slowest {len(slow)} "
        f"(>= {slow[0].latency_ms:.1f} ms)",
        f"{'segment':<8} | {'median, all (ms)':>16} | {'median, slowest (ms)':>20}",
    ]
    for name in SEGMENTS:
        every = statistics.median(p.segments_ms[name] for p in paths)
        worst = statistics.median(p.segments_ms[name] for p in slow)
        lines.append(f"{name:<8} | {every:>16.2f} | {worst:>20.2f}")
    lines.append("slowest events blamed on:")
    for cause, count in Counter(p.blamed for p in slow).most_common():
        lines.append(f"  {count:>5}  {cause}")
    kinds = Counter(kind for kind, _, _ in trace["spans"])
    lines.append("timeline: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    longest = sorted(
        ((end - start) * 1000, kind) for kind, start, end in trace["spans"] if kind != "fetch"
    )[-6:]
    lines.append("longest other spans: " + ", ".join(f"{k} {ms:.1f} ms" for ms, k in longest))
    return "\n".join(lines)
