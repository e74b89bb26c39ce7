"""``outbox check``: can this relay run here? One result per check, with a fix for each failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kombu
from sqlalchemy import Engine, text

from outbox import migrate
from outbox.database import create_outbox_engine
from outbox.redaction import describe_url, redact, redact_error

PASS = "PASS"
FAIL = "FAIL"
SKIP = "SKIP"

# What the relay does to each table: the same grants as outbox/sql/relay_role.sql.
RELAY_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "outbox_event": ("SELECT", "UPDATE", "DELETE"),
    "outbox_partition": ("SELECT", "UPDATE"),
    "outbox_relay": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "outbox_schema": ("SELECT",),
    "outbox_alembic_version": ("SELECT",),
}


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def line(self) -> str:
        text = f"{self.status}  {self.name:<12} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


def run_checks(values: dict[str, Any], connect_timeout: float = 5.0) -> Iterator[CheckResult]:
    """Database, migrations, permissions, broker, exchange; later checks skip when one fails."""
    database_url = values.get("database_url")
    broker_url = values.get("broker_url")
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
        yield from _broker_checks(values, str(broker_url), connect_timeout)


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
        current, head = migrate.current_revision(engine), migrate.head_revision(engine)
        if current != head:
            yield CheckResult(
                name="migrations",
                status=FAIL,
                detail=f"schema at revision {current or 'none (no outbox tables)'}, "
                f"this version needs {head}",
                fix="run `outbox migrate` with a role that may create tables",
            )
        else:
            yield CheckResult(name="migrations", status=PASS, detail=f"schema at {head}")
        yield _permissions(engine)
    finally:
        engine.dispose()


def _permissions(engine: Engine) -> CheckResult:
    if engine.dialect.name != "postgresql":
        return CheckResult(
            name="permissions", status=PASS, detail=f"{engine.dialect.name}: no roles"
        )
    missing: list[str] = []
    with engine.connect() as connection:
        user = connection.execute(text("SELECT current_user")).scalar_one()
        for table_name, privileges in RELAY_PRIVILEGES.items():
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
    values: dict[str, Any], url: str, connect_timeout: float
) -> Iterator[CheckResult]:
    shown = redact(url)
    exchange = str(values.get("exchange") or "outbox")
    try:
        connection = kombu.Connection(url, connect_timeout=connect_timeout, ssl=_tls(values))
    except ValueError as exc:  # a URL that does not parse: a port that is not a number
        yield CheckResult(
            name="broker",
            status=FAIL,
            detail=f"bad broker URL {describe_url(url)}: {redact_error(str(exc), url)}",
            fix="percent-encode the user name and password of the broker URL "
            "(@ is %40, / is %2F, ? is %3F, # is %23, a space is %20)",
        )
        yield CheckResult(name="exchange", status=SKIP, detail="broker unreachable")
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
            return
        yield CheckResult(name="broker", status=PASS, detail=f"connected to {shown}")
        try:
            channel.exchange_declare(exchange, "topic", passive=True)
        except Exception as exc:
            yield CheckResult(
                name="exchange",
                status=FAIL,
                detail=f"exchange {exchange!r}: {_first_line(exc)}",
                fix=f"declare a durable topic exchange {exchange!r} (the relay declares it "
                "itself when its broker user has the configure permission), or set "
                "OUTBOX_EXCHANGE to the exchange you use",
            )
            return
        yield CheckResult(name="exchange", status=PASS, detail=f"exchange {exchange!r} exists")
    finally:
        _close(connection.close)


def _tls(values: dict[str, Any]) -> Any:
    from outbox.runner import broker_tls  # the relay's own TLS options, so both agree

    return broker_tls(values)


def _first_line(exc: BaseException) -> str:
    lines = redact(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _close(close: Callable[[], Any]) -> None:
    try:
        close()
    except Exception:  # closing a broken connection may raise anything
        return
