"""Re-publishing delivered events (``outbox replay``), for consumers rebuilding state.

Design: the chosen rows are read in position order and published directly
through a publisher of their own, batch by batch, each batch confirmed by the
broker before the next is read. The rows are not touched: they stay
'delivered'. Setting them back to 'pending' would look simpler but is wrong:

- the relay would publish them again, and a replayed old event of a key could
  be interleaved with, or held behind, that key's newer pending events, and a
  dead row of the key would hold the replay too;
- the backlog gauges and alerts would report an operator's replay as an
  outage, and the replay would compete with live traffic in the same
  partitions (head-of-line blocking for every service using them);
- retention would not purge them, and ``delivered_at`` (when the event really
  reached consumers) would be lost.

Each message keeps its original event id (message id and ``ce-id``), so
consumers that de-duplicate by id can tell a replay from new events; it also
carries the header ``outbox-replay: true``. Within a replay, the events of one
key arrive in their original order. Live events published by the relay while a
replay runs can arrive in between: consumers rebuilding state should replay
into a dedicated exchange (``--exchange``) or apply events by resource version.

A replay publishes every event to its own ``--exchange``, also an event whose
row names an exchange of its own (``outbox.resource(exchange=...)``): the
operator chooses where a replay goes, and one replay never fans out over
exchanges that live consumers read. The routing key stays the row's.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from outbox.envelope.jsontext import parse_json
from outbox.errors import PublishError
from outbox.logs import emit
from outbox.relay.message import OutgoingMessage, build_message
from outbox.relay.publisher import Publisher, publish_batch
from outbox.store.admin import AdminStore
from outbox.store.rows import EventRow

log = logging.getLogger(__name__)

REPLAY_HEADER = "outbox-replay"


@dataclass(frozen=True, kw_only=True)
class ReplaySelection:
    since: dt.datetime | None = None
    keys: Sequence[str] = ()
    event_ids: Sequence[uuid.UUID] = ()
    after_position: int = 0

    def __post_init__(self) -> None:
        if self.since is None and not self.keys and not self.event_ids:
            raise ValueError("choose events with --since, --key or --ids")


@dataclass(frozen=True, kw_only=True)
class ReplayResult:
    published: int
    last_position: int


def replay(
    store: AdminStore,
    publisher: Publisher,
    selection: ReplaySelection,
    *,
    source: str = "/outbox",
    type_prefix: str | None = None,
    batch_size: int = 500,
    confirm_timeout: float = 10.0,
    attempts: int = 5,
    on_progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Publish the selected delivered events in position order; raise if the broker refuses.

    A failed batch is resent from its first unconfirmed message, up to
    ``attempts`` times; the error then names the position to resume after.
    """
    last = selection.after_position
    published = 0
    try:
        while True:
            rows = store.delivered_for_replay(
                after_position=last,
                limit=batch_size,
                since=selection.since,
                keys=selection.keys,
                event_ids=selection.event_ids,
            )
            if not rows:
                break
            messages = [_message(row, source, type_prefix) for row in rows]
            _publish_confirmed(publisher, messages, confirm_timeout, attempts, last)
            published += len(messages)
            last = rows[-1].position
            if on_progress is not None:
                on_progress(len(messages))
    finally:
        publisher.close()
    emit(log, "replay_finished", "replayed %d events", published, published=published)
    return ReplayResult(published=published, last_position=last)


def _message(row: EventRow, source: str, type_prefix: str | None) -> OutgoingMessage:
    """The message the relay sent for ``row`` (same headers), marked as a replay."""
    data = parse_json(row.payload, exact_integers=False)  # for its action and schema
    schema = data["resource"]["schema"]
    # The replay's own --exchange, never the row's (see the module docstring).
    row = row._replace(exchange=None)
    message = build_message(row, data["action"], schema, source=source, type_prefix=type_prefix)
    message.headers[REPLAY_HEADER] = "true"
    return message


def _publish_confirmed(
    publisher: Publisher,
    messages: list[OutgoingMessage],
    timeout: float,
    attempts: int,
    resume_after: int,
) -> None:
    remaining = messages
    for attempt in range(1, attempts + 1):
        try:
            publisher.connect()
            result = publish_batch(publisher, remaining, timeout)
        except PublishError as exc:
            failure = str(exc)
        else:
            if result.failure is None:
                return
            failure = f"{result.failure}: {result.detail}"
            if result.confirmed:
                resume_after = remaining[result.confirmed - 1].position
            remaining = remaining[result.confirmed :]
        emit(
            log,
            "replay_publish_failed",
            "replay of event %s failed (attempt %d of %d): %s",
            remaining[0].message_id,
            attempt,
            attempts,
            failure,
            level=logging.WARNING,
            event_id=remaining[0].message_id,
            key=remaining[0].headers.get("outbox-key"),
        )
        if attempt < attempts:
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise PublishError(
        f"replay stopped at event {remaining[0].message_id}: {failure}; "
        f"fix the cause and resume with --after-position {resume_after}"
    )
