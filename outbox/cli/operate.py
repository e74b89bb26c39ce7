"""The operator commands: dead, replay, check, drain."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from outbox.cli.settings import Settings, require
from outbox.errors import ConfigurationError
from outbox.store.admin import AdminStore, DeadSelection

CommandFactory = Callable[[str, str, Callable[..., int]], argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILED = 1

DEAD_ACTIONS = ("list", "show", "retry", "skip")


def add_commands(command: CommandFactory) -> None:
    """Register this module's sub-commands with ``command(name, help, run)``."""
    dead = command(
        "dead",
        "inspect dead rows (list, show) and resolve them (retry, skip); every change "
        "is recorded with who and why",
        cmd_dead,
    )
    dead.add_argument("action", choices=DEAD_ACTIONS, help="what to do")
    dead.add_argument("event_ids", nargs="*", metavar="EVENT_ID", help="events (show/retry/skip)")
    dead.add_argument(
        "--key",
        action="append",
        default=[],
        help="dead rows of this ordering key (repeatable) [list, retry, skip]",
    )
    dead.add_argument(
        "--reason-contains",
        default=None,
        metavar="TEXT",
        help="dead rows whose last error contains TEXT, ignoring case [list, retry, skip]",
    )
    dead.add_argument(
        "--all",
        action="store_true",
        dest="every",
        help="every dead row (retry, skip); ids and the other selections narrow it: "
        "all of them must match",
    )
    dead.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rows that would change and their count; change nothing [retry, skip]",
    )
    dead.add_argument("--json", action="store_true", help="print JSON (list, show)")
    dead.add_argument("--limit", type=int, default=1000, help="rows listed (default 1000)")
    dead.add_argument(
        "--actor", default=None, help="who makes the change (default: $USER) [retry, skip]"
    )
    dead.add_argument(
        "--reason", default=None, help="why; required for retry and skip (not with --dry-run)"
    )

    replay = command(
        "replay",
        "re-publish delivered events, keeping their event ids, in their original order "
        "(batch size and CloudEvents source: the relay's OUTBOX_BATCH_SIZE, OUTBOX_SOURCE)",
        cmd_replay,
    )
    replay.add_argument("--since", help="events created since this time (ISO 8601) or age (2h)")
    replay.add_argument("--key", action="append", default=[], help="ordering key (repeatable)")
    replay.add_argument("--ids", nargs="+", default=[], metavar="EVENT_ID", help="event ids")
    replay.add_argument("--after-position", type=int, default=0, help="resume after this position")
    replay.add_argument("--dry-run", action="store_true", help="count the events, publish none")

    check = command(
        "check",
        "verify database, migrations, permissions, broker and exchange (and queues named "
        "with --queue); one line per check with a fix for each failure; exit code 0 only "
        "if none failed (a WARN does not fail)",
        cmd_check,
    )
    check.add_argument(
        "--queue",
        action="append",
        default=[],
        metavar="NAME",
        help="a queue consumers read from the relay's exchange: check that it exists and is "
        "replicated (quorum or stream), warn if it is classic (repeatable)",
    )

    drain = command(
        "drain",
        "publish the pending backlog of the partitions this process can claim, then "
        "exit (with progress on a terminal)",
        cmd_drain,
    )
    drain.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )


# -- dead ---------------------------------------------------------------------


def cmd_dead(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.store.admin import RETRY, SKIP

    command = f"outbox dead {args.action}"
    if args.reason_contains is not None and not args.reason_contains.strip():
        raise ConfigurationError(f"{command}: --reason-contains needs a non-empty TEXT")
    selection = DeadSelection(
        event_ids=[_event_id(text) for text in args.event_ids],
        keys=args.key,
        reason_contains=args.reason_contains,
        every=args.every,
    )
    if args.action == "list":
        return _dead_list(settings, args, selection)
    if args.action == "show":
        if args.key or args.reason_contains is not None or args.every or args.dry_run:
            raise ConfigurationError(f"{command}: takes EVENT_IDs only")
        if not selection.event_ids:
            raise ConfigurationError(f"{command}: give at least one EVENT_ID")
        return _dead_show(settings, list(selection.event_ids), as_json=args.json)
    if selection.is_empty:
        raise ConfigurationError(
            f"{command}: give EVENT_IDs, --key, --reason-contains or --all (which rows?)"
        )
    operation = RETRY if args.action == "retry" else SKIP
    if args.dry_run:
        with _admin_store(settings) as store:
            rows = store.resolve_dead(selection, operation, actor="", reason="", dry_run=True)
        for row in rows:
            print(f"{row.event_id!s:<36}  {row.ordering_key:<24}  {_first_line(row.reason)}")
        verb = "retried" if operation == RETRY else "skipped"
        print(f"{_rows(len(rows))} would be {verb}; nothing changed (--dry-run)")
        return EXIT_OK
    if not args.reason or not args.reason.strip():
        raise ConfigurationError(f"{command}: --reason is required (why?)")
    actor = args.actor or os.environ.get("USER") or _login()
    reason = args.reason.strip()
    with _admin_store(settings) as store:
        rows = store.resolve_dead(selection, operation, actor=actor, reason=reason)
    verb = "back to pending" if operation == RETRY else "skipped"
    for row in rows:
        print(f"{row.event_id} {verb} (by {actor}: {reason})")
    print(f"{_rows(len(rows))} {verb}")
    return EXIT_OK


def _dead_list(settings: Settings, args: argparse.Namespace, selection: DeadSelection) -> int:
    with _admin_store(settings) as store:  # no selection: list them all
        rows = store.dead_rows(
            limit=args.limit, selection=None if selection.is_empty else selection
        )
    if args.json:
        print(json.dumps([row.to_json() for row in rows]))
        return EXIT_OK
    if not rows:
        print("no dead rows")
        return EXIT_OK
    print(f"{'EVENT ID':<36}  {'KEY':<24} {'CREATED':<19}  {'HELD':>5}  REASON")
    for row in rows:
        print(
            f"{row.event_id!s:<36}  {row.ordering_key[:24]:<24} "
            f"{row.created_at:%Y-%m-%d %H:%M:%S}  {row.held_behind:>5}  "
            f"{_first_line(row.reason)[:80]}"
        )
    return EXIT_OK


def _first_line(reason: str | None) -> str:
    return reason.splitlines()[0] if reason else ""


def _rows(count: int) -> str:
    return f"{count} dead row{'' if count == 1 else 's'}"


def _dead_show(settings: Settings, ids: list[uuid.UUID], *, as_json: bool) -> int:
    from outbox.store.admin import NotDead

    with _admin_store(settings) as store:
        details = [(event_id, store.event_detail(event_id)) for event_id in ids]
    missing = [str(event_id) for event_id, detail in details if detail is None]
    if missing:
        raise NotDead(f"no such event: {', '.join(missing)}")
    if as_json:
        print(json.dumps([detail for _, detail in details], default=str))
        return EXIT_OK
    for _, detail in details:
        assert detail is not None
        audit = detail.pop("audit")
        for name, value in detail.items():
            print(f"{name:<15} {value}")
        for entry in audit:
            print(
                f"audit           {entry['at']} {entry['operation']} by {entry['actor']}: "
                f"{entry['reason']}"
            )
        print()
    return EXIT_OK


# -- replay -------------------------------------------------------------------


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.ops.progress import Progress
    from outbox.relay.publisher import open_publisher
    from outbox.relay.replay import ReplaySelection, replay
    from outbox.units import point_in_time

    try:
        since = point_in_time(args.since) if args.since else None
        selection = ReplaySelection(
            since=since,
            keys=args.key,
            event_ids=[_event_id(text) for text in args.ids],
            after_position=args.after_position,
        )
    except ValueError as exc:
        raise ConfigurationError(f"outbox replay: {exc}") from None
    # Batch size and CloudEvents attributes: the relay's (settings.RELAY_ENVIRONMENT).
    relay = settings.relay
    broker = settings.broker
    with _admin_store(settings) as store:
        total = store.count_for_replay(
            since=selection.since, keys=selection.keys, event_ids=selection.event_ids
        )
        if args.dry_run:
            print(f"{total} delivered events match; nothing published (--dry-run)")
            return EXIT_OK
        broker_url = require(broker.url, "broker_url")
        publisher = open_publisher(broker_url, broker.exchange, ssl=broker.tls())
        progress = Progress("replay", total)
        result = replay(
            store,
            publisher,
            selection,
            source=relay.source,  # the headers the relay sent
            type_prefix=relay.type_prefix,
            batch_size=relay.batch_size,
            on_progress=progress.advance,
        )
        progress.finish()
    print(
        f"replayed {result.published} events to exchange {broker.exchange!r} "
        f"(last position {result.last_position})"
    )
    return EXIT_OK


# -- check --------------------------------------------------------------------


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.ops.check import WARN, run_checks

    passed = True
    warnings = 0
    for result in run_checks(settings.database.url, settings.broker, queues=args.queue):
        print(result.line(), flush=True)
        passed = passed and result.passed
        warnings += result.status == WARN
    warned = f" ({warnings} warning{'s' if warnings > 1 else ''})" if warnings else ""
    print(f"all checks passed{warned}" if passed else f"some checks failed{warned}")
    return EXIT_OK if passed else EXIT_FAILED


# -- drain --------------------------------------------------------------------


def cmd_drain(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.cli.runner import build_relay
    from outbox.ops.operations import sql_store
    from outbox.ops.progress import Progress
    from outbox.relay.observer import RelayObserver

    # The relay's own settings (batch size, timeouts...): from the environment
    # (settings.RELAY_ENVIRONMENT).
    relay = build_relay(settings)
    store = sql_store(relay)
    pending = store.backlog().pending
    progress = Progress("drain", pending)

    class Advance(RelayObserver):
        def batch_published(self, count: int, seconds: float) -> None:
            progress.advance(count)

    relay.add_observer(Advance())
    try:
        published = relay.drain(timeout=args.timeout)
        progress.finish()
        left = store.backlog().pending
    finally:
        store.engine.dispose()
    print(f"published {published} events; {left} still pending")
    return EXIT_OK


# -- helpers ------------------------------------------------------------------


@contextmanager
def _admin_store(settings: Settings) -> Iterator[AdminStore]:
    from outbox.store.engine import create_outbox_engine

    store = AdminStore(create_outbox_engine(require(settings.database.url, "database_url")))
    try:
        yield store
    finally:
        store.engine.dispose()


def _event_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ConfigurationError(f"not an event id (a UUID): {text!r}") from None


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
