"""The ``outbox`` command: demo, migrate, relay, status.

Process concerns live here (arguments, environment, signals, logging, exit
codes); the work is done by the library modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from outbox.cli import deploy, operate, schemas
from outbox.cli import settings as config
from outbox.cli.common import as_store_error, engine_from
from outbox.cli.settings import LoggingSettings, Settings
from outbox.errors import ConfigurationError, OutboxError, SchemaNotMigrated
from outbox.logs import emit
from outbox.redaction import redact

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# A reader closed stdout early: 128 + SIGPIPE, what a shell reports for `yes | head -1`.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

log = logging.getLogger("outbox")


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.store import migrate

    engine = engine_from(settings)
    try:
        migrate.upgrade(engine, partitions=args.partitions)
        revision = migrate.current_revision(engine)
    except Exception as exc:
        raise as_store_error(exc) from None
    finally:
        engine.dispose()
    print(f"outbox tables at revision {revision}")
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.store import migrate
    from outbox.store.sqlstore import SqlStore

    engine = engine_from(settings)
    try:
        store = SqlStore(engine)
        counts = store.counts()
        partitions = store.partitions()
        revision = migrate.current_revision(engine)
    finally:
        engine.dispose()
    report = {**counts, "schema_revision": revision, "partitions": partitions}
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    print(f"pending    {counts['pending']}")
    print(f"delivered  {counts['delivered']}")
    print(f"dead       {counts['dead']}  (keys held: {counts['held_keys']})")
    print(f"skipped    {counts['skipped']}")
    age = counts["oldest_pending_age_seconds"]
    print(f"oldest pending age  {'-' if age is None else f'{age:.1f}s'}")
    print(f"schema revision     {revision or 'not migrated'}")
    owners: dict[str, list[int]] = {}
    for p in partitions:
        owners.setdefault(p["owner"] or "(none)", []).append(p["partition"])
    for owner, parts in sorted(owners.items()):
        print(f"partitions {_ranges(parts):<16} owner {owner}")
    return EXIT_OK


def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.cli.runner import run_relay

    stop = threading.Event()
    with _signals(stop):
        run_relay(settings, stop)
    return EXIT_OK


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.cli.demo import run_demo

    if "OUTBOX_LOG_LEVEL" not in os.environ and settings.logging.level == "INFO":
        logging.getLogger("outbox").setLevel(logging.WARNING)  # the demo prints its own story
    return run_demo(settings, directory=args.directory, count=args.count)


def _ranges(numbers: list[int]) -> str:
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = out[-1].split("-")[0] + f"-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


@contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    """First SIGTERM/SIGINT stops gracefully; a second one exits at once."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise SystemExit(EXIT_INTERRUPTED)
        name = signal.Signals(signum).name
        emit(log, "relay_signal_received", "received %s, stopping", name, signal=name)
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox",
        description="Transactional outbox relay: forwards events written in your "
        "database transactions to the message bus, in order.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        config.add_arguments(p, name)
        p.set_defaults(run=run)
        return p

    demo = command(
        "demo",
        "run producer, relay and consumer on an embedded SQLite database and a local "
        "broker folder; no server needed",
        cmd_demo,
    )
    demo.add_argument("--directory", default="outbox-demo", help="where the demo keeps its files")
    demo.add_argument("--count", type=int, default=5, help="resources to create")
    migrate = command("migrate", "create or upgrade the outbox tables", cmd_migrate)
    migrate.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions, fixed at first install (default 16); events are spread over "
        "them by a hash of their key, and relay replicas share them",
    )
    command("relay", "forward committed events to the broker until SIGTERM", cmd_relay)
    status = command("status", "show the backlog, dead rows and partition owners", cmd_status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    # Each adds its sub-commands; command(name, help, run) returns a sub-parser
    # with the shared settings added.
    for module in (schemas, operate, deploy):
        module.add_commands(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.

    A reader that closes stdout early (``outbox check | head -1``) ends the
    command quietly with :data:`EXIT_BROKEN_PIPE`, as a shell reports a
    process killed by SIGPIPE. Python ignores SIGPIPE (sockets need it
    ignored), so the write raises instead; stdout is flushed here, inside the
    guard, so that buffered output meets the closed pipe now and not at exit.
    """
    try:
        try:
            code = _run(argv)
        except SystemExit:
            sys.stdout.flush()  # --help and usage errors: argparse wrote, then exits
            raise
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's broken pipe, not ours to hide
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test or an embedding app
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the final flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = config.load(vars(args), args.command)  # also fails on a malformed URL
        _configure_logging(settings.logging)
        code: int = args.run(settings, args)
        return code
    except SchemaNotMigrated as exc:
        print(f"outbox: {redact(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except ConfigurationError as exc:
        print(f"outbox: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OutboxError as exc:
        print(f"outbox: {redact(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _configure_logging(settings: LoggingSettings) -> None:
    from outbox.ops.logformat import configure

    configure(settings.format, settings.level)


if __name__ == "__main__":
    sys.exit(main())
