"""``outbox check``: can this relay run here? One result per check, with a fix for each failure."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import kombu
from sqlalchemy import Engine, text

from outbox.errors import ConfigurationError, StoreError
from outbox.ops.queue_type import REPLICATED, queue_type
from outbox.redaction import describe_url, redact, redact_error
from outbox.relay.nodes import node_tls, split_broker_urls
from outbox.relay.publisher import BrokerSettings
from outbox.store import migrate
from outbox.store.engine import create_outbox_engine
from outbox.store.privileges import RELAY_PRIVILEGES

PASS = "PASS"
WARN = "WARN"  # the relay runs, but not as safely as it could
FAIL = "FAIL"
SKIP = "SKIP"


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status in (PASS, WARN)

    def line(self) -> str:
        text = f"{self.status}  {self.name:<12} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


def run_checks(
    database_url: str | None,
    broker: BrokerSettings,
    connect_timeout: float = 5.0,
    queues: Sequence[str] = (),
) -> Iterator[CheckResult]:
    """Database, migrations, permissions, broker, exchange, ``queues``; later checks skip
    when one fails."""
    broker_url = broker.url
    if not database_url:
        yield CheckResult(
            name="database",
            status=FAIL,
            detail="no database URL",
            fix="set OUTBOX_DATABASE_URL (or --database-url, or OUTBOX_DATABASE_URL_FILE)",
        )
    else:
        yield from _database_checks(str(database_url), connect_timeout)
    if not broker_url:
        yield CheckResult(
            name="broker",
            status=FAIL,
            detail="no broker URL",
            fix="set OUTBOX_BROKER_URL (or --broker-url, or OUTBOX_BROKER_URL_FILE)",
        )
    else:
        yield from _broker_checks(broker, str(broker_url), connect_timeout, queues)


def _database_checks(url: str, connect_timeout: float) -> Iterator[CheckResult]:
    shown = redact(url)
    connect_args = {"connect_timeout": int(connect_timeout)} if url.startswith("postgres") else {}
    engine = create_outbox_engine(url, connect_args=connect_args, pool_pre_ping=False)
    try:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:
            yield CheckResult(
                name="database",
                status=FAIL,
                detail=f"cannot connect to {shown}: {_first_line(exc)}",
                fix="check host, port, database name, credentials and sslmode in the "
                "database URL, and that the database accepts connections from here",
            )
            for name in ("migrations", "permissions"):
                yield CheckResult(name=name, status=SKIP, detail="database unreachable")
            return
        yield CheckResult(name="database", status=PASS, detail=f"connected to {shown}")
        yield _migrations(engine)
        yield _permissions(engine)
    finally:
        engine.dispose()


def _migrations(engine: Engine) -> CheckResult:
    head = migrate.head_revision(engine)
    try:
        installed = migrate.installed_revision(engine)
    except StoreError as exc:
        return CheckResult(
            name="migrations",
            status=FAIL,
            detail=str(exc),
            fix=f"as the owner of {migrate.SERVICE_VERSION_TABLE}, grant SELECT on it to this role",
        )
    if installed.revision == head:
        return CheckResult(
            name="migrations",
            status=PASS,
            detail=f"schema at {head} (recorded in {installed.version_table})",
        )
    return CheckResult(
        name="migrations",
        status=FAIL,
        detail=f"schema at revision {installed.revision or 'none (no outbox revision recorded)'}"
        f", this version needs {head}",
        fix=f"run {installed.upgrade_command} with a role that may create tables",
    )


def relay_privileges(version_table: str) -> dict[str, tuple[str, ...]]:
    """The relay's privileges where the revision is recorded in ``version_table``
    (ours, or the service's ``alembic_version`` when its history holds our migrations)."""
    privileges = dict(RELAY_PRIVILEGES)
    if version_table != migrate.VERSION_TABLE:
        del privileges[migrate.VERSION_TABLE]
        privileges[version_table] = ("SELECT",)
    return privileges


def _version_table(engine: Engine) -> str:
    try:
        return migrate.installed_revision(engine).version_table or migrate.VERSION_TABLE
    except StoreError:  # the service's table is unreadable: the migrations check says so
        return migrate.SERVICE_VERSION_TABLE


def _permissions(engine: Engine) -> CheckResult:
    if engine.dialect.name != "postgresql":
        return CheckResult(
            name="permissions", status=PASS, detail=f"{engine.dialect.name}: no roles"
        )
    missing: list[str] = []
    privileges_by_table = relay_privileges(_version_table(engine))
    with engine.connect() as connection:
        user = connection.execute(text("SELECT current_user")).scalar_one()
        for table_name, privileges in privileges_by_table.items():
            exists = connection.execute(
                text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table_name}
            ).scalar_one()
            if not exists:
                missing.append(f"{table_name} (missing table)")
                continue
            for privilege in privileges:
                allowed = connection.execute(
                    text("SELECT has_table_privilege(:t, :p)"),
                    {"t": table_name, "p": privilege},
                ).scalar_one()
                if not allowed:
                    missing.append(f"{privilege} on {table_name}")
    if missing:
        return CheckResult(
            name="permissions",
            status=FAIL,
            detail=f"role {user} lacks " + ", ".join(missing),
            fix=f"as the owner of the outbox tables run `outbox grant-relay-role {user}` "
            f"(or GRANT the listed privileges TO {user})",
        )
    return CheckResult(
        name="permissions", status=PASS, detail=f"role {user} has what the relay needs"
    )


def _broker_checks(
    broker: BrokerSettings, url: str, connect_timeout: float, queues: Sequence[str]
) -> Iterator[CheckResult]:
    """The broker and exchange checks on the first node of the URL list that answers.

    The relay goes round the same list in the same order (outbox.relay.nodes);
    the nodes that did not answer are named in the broker check's detail.
    """
    try:
        nodes = split_broker_urls(url)
    except ConfigurationError:
        nodes = [url]  # the single-URL checks below report what is wrong with it
    unreachable: list[str] = []
    for node in nodes[:-1]:
        try:
            with kombu.Connection(
                node, connect_timeout=connect_timeout, ssl=node_tls(broker.tls(), node)
            ) as probe:
                probe.ensure_connection(max_retries=0)
        except Exception as exc:
            unreachable.append(f"{redact(node)} ({_first_line(exc)})")
            continue
        nodes = [node]
        break
    for result in _node_checks(broker, nodes[-1], connect_timeout, queues):
        if result.name == "broker" and result.passed and unreachable:
            detail = f"{result.detail}; unreachable: {', '.join(unreachable)}"
            result = CheckResult(name="broker", status=PASS, detail=detail)
        yield result


def _node_checks(
    broker: BrokerSettings, url: str, connect_timeout: float, queues: Sequence[str]
) -> Iterator[CheckResult]:
    shown = redact(url)
    exchange = broker.exchange or "outbox"
    try:
        # The relay's own TLS options (BrokerSettings.tls), so that both agree.
        connection = kombu.Connection(
            url, connect_timeout=connect_timeout, ssl=node_tls(broker.tls(), url)
        )
    except ValueError as exc:  # a URL that does not parse: a port that is not a number
        yield CheckResult(
            name="broker",
            status=FAIL,
            detail=f"bad broker URL {describe_url(url)}: {redact_error(str(exc), url)}",
            fix="percent-encode the user name and password of the broker URL "
            "(@ is %40, / is %2F, ? is %3F, # is %23, a space is %20)",
        )
        yield CheckResult(name="exchange", status=SKIP, detail="broker unreachable")
        yield from _skipped_queues(queues)
        return
    try:
        try:
            connection.connect()
            channel = connection.channel()
        except Exception as exc:
            yield CheckResult(
                name="broker",
                status=FAIL,
                detail=f"cannot connect to {shown}: {_first_line(exc)}",
                fix="check host, port, virtual host, credentials and TLS settings "
                "(amqps://, OUTBOX_BROKER_SSL_CA) of the broker URL",
            )
            yield CheckResult(name="exchange", status=SKIP, detail="broker unreachable")
            yield from _skipped_queues(queues)
            return
        _close(channel.close)
        yield CheckResult(name="broker", status=PASS, detail=f"connected to {shown}")
        yield _exchange(connection, exchange)
        for queue in queues:
            yield _queue(connection, queue, exchange)
    finally:
        _close(connection.close)


def _skipped_queues(queues: Sequence[str]) -> Iterator[CheckResult]:
    for queue in queues:
        yield CheckResult(name="queue", status=SKIP, detail=f"{queue!r}: broker unreachable")


def _queue(connection: kombu.Connection, queue: str, exchange: str) -> CheckResult:
    """Whether a consumers' queue survives the loss of a node: quorum or stream, not classic.

    A confirm from a classic queue means one node has the message; if that
    node is lost, so is everything the relay had marked delivered and no
    consumer had read yet. Bindings cannot be listed over AMQP 0-9-1, so the
    queues are the ones named (``--queue``); :mod:`outbox.ops.queue_type` says
    how the type is told without the management API.
    """
    found = queue_type(connection, queue)
    if not found.exists:
        return CheckResult(
            name="queue",
            status=FAIL,
            detail=f"queue {queue!r} does not exist on this node's virtual host: "
            "what the relay publishes for it is returned as unroutable",
            fix=f"declare {queue!r} (durable, x-queue-type: quorum) and bind it to "
            f"exchange {exchange!r}, or check the name",
        )
    if found.kind is None:
        return CheckResult(
            name="queue",
            status=WARN,
            detail=f"queue {queue!r}: could not tell its type ({found.detail})",
            fix="check it with `rabbitmqctl list_queues name type` (want quorum or stream)",
        )
    if found.kind in REPLICATED:
        return CheckResult(
            name="queue",
            status=PASS,
            detail=f"queue {queue!r} is a {found.kind} queue: replicated, a confirm means "
            "a majority of its members has the message",
        )
    durable = "" if found.durable else ", not durable"
    return CheckResult(
        name="queue",
        status=WARN,
        detail=f"queue {queue!r} is a {found.kind} queue{durable}: it lives on one node, and "
        "what it holds is lost with that node, even after the relay marked it delivered",
        fix=f"move its consumers to a quorum queue (x-queue-type: quorum, durable) bound to "
        f"exchange {exchange!r}; docs/replicas.md, Clusters",
    )


def _exchange(connection: kombu.Connection, exchange: str) -> CheckResult:
    """Whether the relay's declare of its exchange succeeds, found by making it.

    The relay declares a durable topic exchange each time it connects
    (``AmqpPublisher.connect``, ``KombuPublisher.connect`` in outbox.relay.publisher),
    also when the exchange exists. RabbitMQ then wants the configure permission
    on the exchange's name, and refuses an exchange of another type or
    durability; a relay refused retries forever. So this check makes the same
    declare: its verdict is the relay's. A passive declare first tells whether
    the exchange existed. If it did, the second declare changes nothing; if it
    did not, the second declare creates it exactly as the relay would at start.
    That is the one side effect of ``outbox check``, and one the relay has anyway.
    """
    existed = _declare(connection, exchange, passive=True) is None
    refused = _declare(connection, exchange, passive=False)
    if refused is None:
        detail = (
            f"exchange {exchange!r} exists, and this user may declare it as the relay does"
            if existed
            else f"exchange {exchange!r} was missing: declared it (durable topic) as the "
            "relay does at start; this user may configure it"
        )
        return CheckResult(name="exchange", status=PASS, detail=detail)
    reason = _first_line(refused)
    user, vhost = connection.userid, connection.virtual_host
    code = getattr(refused, "code", None)  # the AMQP reply code, for py-amqp's errors
    reserved = exchange.startswith("amq.")  # RabbitMQ's own: no user creates or deletes them
    if code == 403 and not reserved:
        missing = "" if existed else " (missing)"
        return CheckResult(
            name="exchange",
            status=FAIL,
            detail=f"broker user {user!r} may not configure exchange {exchange!r}{missing}: "
            "the relay declares it at every connect and would be refused, and retry forever",
            fix=f"give {user!r} the configure permission on {exchange!r} in virtual host "
            f"{vhost!r}, keeping its write and read patterns (RabbitMQ: `rabbitmqctl "
            f"set_permissions -p {vhost} {user} '^{re.escape(exchange)}$' WRITE READ`), "
            "or set OUTBOX_EXCHANGE to an exchange it may configure",
        )
    if code == 406 and not reserved:
        return CheckResult(
            name="exchange",
            status=FAIL,
            detail=f"exchange {exchange!r} is not the durable topic exchange the relay "
            f"declares: {reason}",
            fix=f"delete exchange {exchange!r} so that the relay declares it (durable, "
            "topic), or set OUTBOX_EXCHANGE to a durable topic exchange",
        )
    return CheckResult(
        name="exchange",
        status=FAIL,
        detail=f"cannot declare exchange {exchange!r} as the relay does: {reason}",
        fix="set OUTBOX_EXCHANGE to a durable topic exchange this user may configure "
        "(names starting with amq. are reserved by RabbitMQ)",
    )


def _declare(connection: kombu.Connection, exchange: str, *, passive: bool) -> Exception | None:
    """The relay's declare, on a channel of its own (a refused declare closes the channel)."""
    try:
        channel = connection.channel()
        # py-amqp's default is auto_delete=True: say False, as the relay does.
        channel.exchange_declare(
            exchange=exchange, type="topic", durable=True, auto_delete=False, passive=passive
        )
    except Exception as exc:
        return exc
    _close(channel.close)
    return None


def _first_line(exc: BaseException) -> str:
    lines = redact(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _close(close: Callable[[], Any]) -> None:
    try:
        close()
    except Exception:  # closing a broken connection may raise anything
        return
