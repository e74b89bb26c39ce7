"""Every setting of the CLI, declared once: flag, environment variable, default, meaning.

The CLI's flags and the configuration reference (docs/configuration.md) are
both generated from :data:`SETTINGS`, so they cannot drift. A secret setting
may also be read from a file named by ``OUTBOX_<NAME>_FILE`` (Docker and
Kubernetes secrets).

:func:`load` resolves them once per command into :class:`Settings`: frozen,
typed groups, each the object that one part of the relay takes
(:class:`~outbox.relay.loop.RelaySettings` for the loop,
:class:`~outbox.relay.publisher.BrokerSettings` for the publisher and
``outbox check``, :class:`~outbox.ops.operations.OperationsSettings` for the
HTTP server and the scheduled jobs). Nothing below the CLI reads a setting by
its name.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from outbox.errors import ConfigurationError
from outbox.ops.operations import OperationsSettings
from outbox.redaction import SecretUrl, register_secrets_in
from outbox.relay.loop import RelaySettings
from outbox.relay.publisher import BrokerSettings
from outbox.relay.settings import DEFAULT_WINDOW
from outbox.store.engine import normalize_url
from outbox.units import duration_seconds, port_number


@dataclass(frozen=True, kw_only=True)
class Setting:
    name: str  # snake_case; flag --kebab-case, env OUTBOX_UPPER_CASE
    help: str
    default: Any = None  # as the reference shows it; parsed into parsed_default
    parse: Callable[[str], Any] = str
    secret: bool = False
    required: bool = False  # shown as "(required)" in the reference when it has no default
    commands: tuple[str, ...] = ()  # empty: every command
    parsed_default: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The default goes through the parser of user input: a bad one fails at import.
        parsed = None
        if self.default is not None:
            try:
                parsed = self.parse(str(self.default))
            except ValueError as exc:
                raise ValueError(f"the default of {self.name} is not valid: {exc}") from None
        object.__setattr__(self, "parsed_default", parsed)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "OUTBOX_" + self.name.upper()


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):  # `not >` also rejects NaN
        raise ValueError(f"expected a finite number above 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise ValueError(f"expected a whole number of 0 or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"expected a whole number above 0, got {text!r}")
    return value


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off (true/false, 1/0), got {text!r}")


def readable_file(text: str) -> str:
    if not text or not os.path.isfile(text):
        raise ValueError(f"no such file: {text!r}")
    return text


def existing_directory(text: str) -> str:
    if not text or not os.path.isdir(text):
        raise ValueError(f"no such directory: {text!r}")
    return text


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    parse.__name__ = "one of " + "|".join(options)
    return parse


RELAY = ("relay", "demo")
DEFAULT_DATABASE_URL = "sqlite:///outbox-demo/outbox.db"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        name="database_url",
        help="SQLAlchemy URL of the database holding the outbox tables "
        "(postgresql://user@host/db uses psycopg 3)",
        secret=True,
        required=True,
    ),
    Setting(
        name="broker_url",
        help="kombu URL of the broker (amqp://user:pass@host:5672//); "
        "AMQP URLs get pipelined publisher confirms; several nodes of a cluster as "
        "url1;url2;url3, tried in order from the last node that worked "
        "(see docs/replicas.md#clusters)",
        secret=True,
        required=True,
    ),
    Setting(name="exchange", help="topic exchange the relay publishes to", default="outbox"),
    Setting(
        name="batch_size",
        help="rows fetched (and marked delivered) per database round trip",
        default=500,
        parse=positive_int,
        commands=RELAY,
    ),
    Setting(
        name="window",
        help="messages sent and not yet confirmed by the broker, at most (never two of "
        "one ordering key); the relay sends as confirms free room",
        default=DEFAULT_WINDOW,
        parse=positive_int,
        commands=RELAY,
    ),
    Setting(
        name="poll_interval",
        help="seconds between polls when no NOTIFY wakes the relay",
        default=1.0,
        parse=positive_float,
        commands=RELAY,
    ),
    Setting(
        name="lease_ttl",
        help="seconds a partition lease lasts; a dead relay's partitions move "
        "to the others within this time",
        default=15.0,
        parse=positive_float,
        commands=RELAY,
    ),
    Setting(
        name="confirm_timeout",
        help="seconds to wait for the broker to confirm a message; past it, everything "
        "in flight is resent on a new connection",
        default=10.0,
        parse=positive_float,
        commands=RELAY,
    ),
    Setting(
        name="unroutable",
        help="what to do with a message no queue is bound for: retry (keep it "
        "pending, back off) or dead (mark it dead, hold its key)",
        default="retry",
        parse=choice("retry", "dead"),
        commands=RELAY,
    ),
    Setting(
        name="max_payload_bytes",
        help="largest message body the relay sends (bytes); a larger row is marked dead "
        "and holds its key. Keep it below the broker's own limit (RabbitMQ: "
        "max_message_size) and at or above the producers' ProducerOptions.max_payload_bytes",
        default=1024 * 1024,
        parse=positive_int,
        commands=RELAY,
    ),
    Setting(
        name="max_attempts",
        help="mark an event dead (holding its key) once the broker nacked it or returned "
        "it as unroutable this many times; 0: retry for ever, with backoff. Timeouts and "
        "lost connections never count",
        default=0,
        parse=non_negative_int,
        commands=RELAY,
    ),
    Setting(
        name="listen",
        help="wake up on PostgreSQL NOTIFY (needs a session connection, not a "
        "transaction-mode pooler)",
        default=True,
        parse=boolean,
        commands=RELAY,
    ),
    Setting(
        name="source",
        help="CloudEvents source (ce-source) of every message: a URI reference that names "
        "the producing service, e.g. https://cases.example.org or /cases; auto: a slash "
        "and the database name (/cases for postgresql://db/cases)",
        default="auto",
        commands=RELAY,
    ),
    Setting(
        name="type_prefix",
        help="start of every CloudEvents type (ce-type), before <resource type>.<action>; "
        "auto: the host of the event's schema URI in reverse-DNS order and a dot "
        "(https://example.org/schemas/case gives org.example.case.update); none: no prefix",
        default="auto",
        commands=RELAY,
    ),
    # -- relay performance and scale-out settings --
    Setting(
        name="prepared_statements",
        help="use server-side prepared statements for the relay's queries; turn off "
        "behind PgBouncer older than 1.21 (or without max_prepared_statements) in "
        "transaction mode",
        default=True,
        parse=boolean,
        commands=RELAY,
    ),
    # -- schema registry settings --
    Setting(
        name="validate_content",
        help="validate each event's content against its registered schema before "
        "forwarding it; a failing event is marked dead and holds its key",
        default=True,
        parse=boolean,
        commands=RELAY,
    ),
    Setting(
        name="strict_schemas",
        help="mark dead an event whose schema URI is not registered (default: forward "
        "it unvalidated, logged once per URI)",
        default=False,
        parse=boolean,
        commands=RELAY,
    ),
    Setting(
        name="body_format",
        help="message body: json (the envelope), or avro (Avro single-object encoding "
        "of the content for resources registered with an Avro schema; JSON otherwise)",
        default="json",
        parse=choice("json", "avro"),
        commands=RELAY,
    ),
    Setting(
        name="schema_compatibility",
        help="check a new schema version against the previous one: none, backward "
        "(new reads old), forward (old reads new), or full",
        default="backward",
        parse=choice("none", "backward", "forward", "full"),
        commands=("schemas",),
    ),
    # -- operations settings: metrics, health, retention, TLS --
    Setting(
        name="http_port",
        help="port of the HTTP server for /livez, /readyz and /metrics (0: no server)",
        default=0,
        parse=port_number,
        commands=("relay",),
    ),
    Setting(
        name="http_host",
        help="address the HTTP server listens on",
        default="0.0.0.0",
        commands=("relay",),
    ),
    Setting(
        name="metrics_interval",
        help="seconds between reads of the table gauges (backlog, oldest pending, dead)",
        default=15.0,
        parse=positive_float,
        commands=("relay",),
    ),
    Setting(
        name="retention",
        help="how long delivered rows are kept (30m, 12h, 7d); 0 deletes each row "
        "when the broker confirms it",
        default="7d",
        parse=duration_seconds,
        commands=("relay",),
    ),
    Setting(
        name="secrets_dir",
        help="directory of secret files named after the setting (database_url, "
        "broker_url), as mounted by Docker or Kubernetes secrets; used when neither "
        "the variable nor its _FILE variant is set",
        parse=existing_directory,
    ),
    Setting(
        name="broker_ssl_ca",
        help="CA certificate file (PEM) that verifies the broker's TLS certificate "
        "and host name; implies TLS (use an amqps:// URL and the TLS port)",
        parse=readable_file,
    ),
    Setting(
        name="broker_ssl_cert",
        help="client certificate file (PEM) for brokers that require mutual TLS",
        parse=readable_file,
    ),
    Setting(
        name="broker_ssl_key",
        help="private key file (PEM) of the client certificate",
        parse=readable_file,
    ),
    Setting(
        name="log_format",
        help="log output: json, text, or auto (text on a terminal, json otherwise)",
        default="auto",
        parse=choice("auto", "json", "text"),
    ),
    Setting(
        name="log_level",
        help="minimum log level",
        default="INFO",
        parse=choice("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
)

BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}

# Commands that do the relay's work outside `outbox relay` and have no flags
# for its settings (batch size, timeouts, CloudEvents source...): they read
# them from the relay's environment variables.
RELAY_ENVIRONMENT = ("replay", "drain")


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """The database holding the outbox tables, and how the relay talks to it."""

    url: str | None  # a SecretUrl: repr() hides the password
    listen: bool  # wake up on NOTIFY
    prepared_statements: bool

    def __post_init__(self) -> None:
        if self.url is not None and not isinstance(self.url, SecretUrl):
            object.__setattr__(self, "url", SecretUrl(self.url))


@dataclass(frozen=True, kw_only=True)
class SchemaSettings:
    """The schema registry: what the relay checks and sends, what a new version must keep."""

    validate_content: bool
    strict: bool  # mark dead an event whose schema URI is not registered
    body_format: str  # json or avro
    compatibility: str  # none, backward, forward, full


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    format: str  # auto, json, text
    level: str  # DEBUG, INFO, WARNING, ERROR


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of one command, parsed, grouped by the part that takes it.

    A setting the command does not accept has its default (for the commands
    of :data:`RELAY_ENVIRONMENT`, the relay's settings come from the
    environment instead). ``repr()`` is safe to log: the URLs are
    :class:`~outbox.redaction.SecretUrl`.
    """

    database: DatabaseSettings
    broker: BrokerSettings
    relay: RelaySettings
    schemas: SchemaSettings
    operations: OperationsSettings
    logging: LoggingSettings
    secrets_dir: str | None


def require(value: str | None, name: str) -> str:
    """``value`` of the setting ``name`` when it was given, or a one-line error naming how."""
    if not value:
        setting = BY_NAME[name]
        raise ConfigurationError(f"{setting.flag} (or {setting.env}) is required")
    return value


def applies_to(setting: Setting, command: str) -> bool:
    return not setting.commands or command in setting.commands


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Flags for ``command``; their defaults come from the environment at parse time."""
    for setting in SETTINGS:
        if not applies_to(setting, command):
            continue
        default = f" (default: {setting.default})" if setting.default is not None else ""
        file_hint = f"; or a file named by {setting.env}_FILE" if setting.secret else ""
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            metavar=setting.name.split("_")[-1].upper(),
            help=f"{setting.help}{default} [env: {setting.env}{file_hint}]",
        )


def resolve(
    values: Mapping[str, Any], command: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Flag value, else environment (or ``_FILE``), else default; parsed and checked."""
    environ = os.environ if environ is None else environ
    resolved: dict[str, Any] = {}
    secrets_dir = values.get("secrets_dir") or environ.get("OUTBOX_SECRETS_DIR")
    for setting in SETTINGS:
        if not applies_to(setting, command):
            continue
        raw = values.get(setting.name)
        origin = setting.flag
        if raw is None and setting.env in environ:
            raw, origin = environ[setting.env], setting.env
        if raw is None and setting.secret and f"{setting.env}_FILE" in environ:
            raw, origin = (
                _read_secret(environ[f"{setting.env}_FILE"], setting),
                setting.env + "_FILE",
            )
        if raw is None and setting.secret and secrets_dir:
            raw, origin = _read_from_secrets_dir(str(secrets_dir), setting)
        if raw is None:
            resolved[setting.name] = setting.parsed_default
            continue
        if setting.secret and isinstance(raw, str):
            register_secrets_in(raw)  # redacted from here on, in every log record and error
        try:
            resolved[setting.name] = setting.parse(str(raw)) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise ConfigurationError(f"{origin}: {exc}") from None
    return resolved


def load(
    values: Mapping[str, Any], command: str, environ: Mapping[str, str] | None = None
) -> Settings:
    """The settings of ``command``: resolved once (:func:`resolve`), checked, typed.

    ``values`` are the flags (``vars(args)``); a value that is not a string is
    taken as it is (tests, embedding code). A malformed database URL fails here.
    """
    environ = os.environ if environ is None else environ
    resolved = resolve(values, command, environ)
    if command in RELAY_ENVIRONMENT:
        resolved = {**resolve({}, "relay", environ), **resolved}
    return _typed({**{s.name: s.parsed_default for s in SETTINGS}, **resolved})


def _typed(values: Mapping[str, Any]) -> Settings:
    database_url = values["database_url"]
    if database_url:
        normalize_url(database_url)  # fail early on a malformed URL
    retention = float(values["retention"])
    return Settings(
        database=DatabaseSettings(
            url=database_url,
            listen=values["listen"],
            prepared_statements=values["prepared_statements"],
        ),
        broker=BrokerSettings(
            url=values["broker_url"],
            exchange=values["exchange"],
            ssl_ca=values["broker_ssl_ca"],
            ssl_cert=values["broker_ssl_cert"],
            ssl_key=values["broker_ssl_key"],
        ),
        relay=RelaySettings(
            batch_size=values["batch_size"],
            window=values["window"],
            poll_interval=values["poll_interval"],
            lease_ttl=values["lease_ttl"],
            confirm_timeout=values["confirm_timeout"],
            unroutable=values["unroutable"],
            source=ce_source(values),
            type_prefix=ce_type_prefix(values),
            max_payload_bytes=values["max_payload_bytes"],
            max_attempts=values["max_attempts"],
            # A retention of 0 deletes rows on delivery.
            delete_on_delivery=retention == 0,
        ),
        schemas=SchemaSettings(
            validate_content=values["validate_content"],
            strict=values["strict_schemas"],
            body_format=values["body_format"],
            compatibility=values["schema_compatibility"],
        ),
        operations=OperationsSettings(
            http_host=values["http_host"],
            http_port=values["http_port"],
            metrics_interval=values["metrics_interval"],
            retention=retention,
        ),
        logging=LoggingSettings(format=values["log_format"], level=values["log_level"]),
        secrets_dir=values["secrets_dir"],
    )


def ce_source(values: Mapping[str, Any]) -> str:
    """``ce-source``: the setting, or for ``auto`` a slash and the database's name."""
    source = str(values.get("source") or "auto")
    if source != "auto":
        return source
    url = normalize_url(values["database_url"]) if values.get("database_url") else None
    if url is None or not url.database:
        return "/outbox"
    # SQLite names a file: its stem ("/srv/app/cases.db" -> "cases").
    name = PurePath(url.database).stem if url.get_backend_name() == "sqlite" else url.database
    return "/" + name


def ce_type_prefix(values: Mapping[str, Any]) -> str | None:
    """The start of ``ce-type``; None (``auto``) derives it from each event's schema URI."""
    prefix = str(values.get("type_prefix") or "auto")
    return {"auto": None, "none": ""}.get(prefix, prefix)


def _read_secret(path: str, setting: Setting) -> str:
    try:
        return Path(path).read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(
            f"{setting.env}_FILE: cannot read {path!r}: {exc.strerror}"
        ) from None
    except ValueError as exc:  # a NUL in the path, or a file that is not UTF-8
        raise ConfigurationError(f"{setting.env}_FILE: cannot read {path!r}: {exc}") from None


def _read_from_secrets_dir(directory: str, setting: Setting) -> tuple[str | None, str]:
    """The setting's file in the secrets directory, when there is one."""
    origin = f"{setting.env} (OUTBOX_SECRETS_DIR)"
    try:
        path = Path(directory) / setting.name
        if not path.is_file():
            return None, origin
        return path.read_text("utf-8").strip(), origin
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"OUTBOX_SECRETS_DIR: cannot read {setting.name!r} in {directory!r}: {exc}"
        ) from None


def reference_markdown(settings: Iterable[Setting] = SETTINGS) -> str:
    """The configuration reference table, as written to docs/configuration.md."""
    lines = [
        "| Flag | Environment variable | Default | Commands | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in settings:
        env = f"`{s.env}`" + (f" or `{s.env}_FILE`" if s.secret else "")
        default = f"`{s.default}`" if s.default is not None else "(unset)"
        if s.default is None and s.required:
            default = "(required)"
        commands = ", ".join(s.commands) if s.commands else "all"
        lines.append(f"| `{s.flag}` | {env} | {default} | {commands} | {s.help} |")
    return "\n".join(lines) + "\n"
