"""Typed settings (outbox.cli.settings.load): parsed defaults, units, errors, frozen, no secrets
in repr. No server needed."""

from __future__ import annotations

import dataclasses

import pytest

from outbox.cli import settings as config
from outbox.errors import ConfigurationError
from outbox.ops.operations import OperationsSettings
from outbox.redaction import SecretUrl, clear_secrets
from outbox.relay.loop import RelaySettings
from outbox.relay.publisher import BrokerSettings
from outbox.units import duration_seconds

DATABASE_URL = "postgresql://relay:db-s3cret@db.internal:5432/cases"
BROKER_URL = "amqp://relay:mq-s3cr%40t@mq.internal:5672//"


def test_every_default_is_parsed_like_user_input() -> None:
    for setting in config.SETTINGS:
        if setting.default is None:
            assert setting.parsed_default is None
        else:
            assert setting.parsed_default == setting.parse(str(setting.default)), setting.name
    assert config.BY_NAME["retention"].parsed_default == 7 * 86400.0  # "7d", in seconds
    assert config.BY_NAME["http_port"].parsed_default == 0
    assert config.BY_NAME["listen"].parsed_default is True


def test_a_bad_default_fails_when_the_setting_is_declared() -> None:
    with pytest.raises(ValueError, match="the default of retention is not valid: expected a dur"):
        config.Setting(name="retention", help="", default="a week", parse=duration_seconds)
    with pytest.raises(ValueError, match="the default of batch_size is not valid"):
        config.Setting(name="batch_size", help="", default=0, parse=config.positive_int)


def test_the_defaults_are_those_of_the_library_types() -> None:
    """The CLI's defaults and those of an embedded relay's types cannot drift apart."""
    settings = config.load({}, "relay", environ={})
    assert settings.relay == RelaySettings()
    assert settings.operations == OperationsSettings()
    assert settings.broker == BrokerSettings(url=None, exchange="outbox")
    assert settings.database == config.DatabaseSettings(
        url=None, listen=True, prepared_statements=True
    )
    assert settings.schemas == config.SchemaSettings(
        validate_content=True, strict=False, body_format="json", compatibility="backward"
    )
    assert settings.logging == config.LoggingSettings(format="auto", level="INFO")


def test_values_are_parsed_with_their_units_and_grouped() -> None:
    settings = config.load(
        {"retention": "12h", "batch_size": "50", "http_port": "9100"},
        "relay",
        environ={
            "OUTBOX_DATABASE_URL": DATABASE_URL,
            "OUTBOX_BROKER_URL": BROKER_URL,
            "OUTBOX_POLL_INTERVAL": "0.5",
            "OUTBOX_LISTEN": "off",
            "OUTBOX_TYPE_PREFIX": "none",
        },
    )
    assert settings.operations.retention == 43200.0
    assert settings.operations.http_port == 9100
    assert settings.relay.batch_size == 50
    assert settings.relay.poll_interval == 0.5
    assert settings.relay.source == "/cases"  # auto: the database's name
    assert settings.relay.type_prefix == ""
    assert not settings.relay.delete_on_delivery
    assert settings.database.listen is False
    assert settings.database.url == DATABASE_URL
    assert settings.broker.url == BROKER_URL
    assert config.load({"retention": "0"}, "relay", environ={}).relay.delete_on_delivery


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (
            {},
            {"OUTBOX_BATCH_SIZE": "many"},
            "OUTBOX_BATCH_SIZE: expected a whole number, got 'many'",
        ),
        (
            {"retention": "a week"},
            {},
            "--retention: expected a duration such as 30s, 15m, 12h or 7d, got 'a week'",
        ),
        ({"http_port": "70000"}, {}, "--http-port: expected a port number between 0 and 65535"),
        (
            {},
            {"OUTBOX_DATABASE_URL": "postgresql://db:port/app"},
            "database URL 'postgresql://db:port/app' is not a SQLAlchemy URL",
        ),
    ],
)
def test_a_bad_value_gives_the_error_naming_where_it_came_from(
    flags: dict[str, str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        config.load(flags, "relay", environ)
    assert str(caught.value).startswith(message)


def test_only_replay_and_drain_read_the_relay_settings_of_other_commands() -> None:
    environ = {"OUTBOX_BATCH_SIZE": "7", "OUTBOX_SOURCE": "/cases"}
    for command in config.RELAY_ENVIRONMENT:
        assert config.load({}, command, environ).relay.batch_size == 7
        assert config.load({}, command, environ).relay.source == "/cases"
    # Other commands never read them: a bad one does not stop `outbox status`.
    status = config.load({}, "status", {"OUTBOX_BATCH_SIZE": "many"})
    assert status.relay.batch_size == 500
    with pytest.raises(ConfigurationError, match="OUTBOX_BATCH_SIZE"):
        config.load({}, "drain", {"OUTBOX_BATCH_SIZE": "many"})


def test_settings_are_frozen() -> None:
    settings = config.load({}, "relay", environ={})
    groups = [
        settings,
        settings.database,
        settings.broker,
        settings.relay,
        settings.schemas,
        settings.operations,
        settings.logging,
    ]
    for group in groups:
        name = dataclasses.fields(group)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(group, name, None)


@pytest.mark.parametrize(
    ("database_url", "broker_url", "secrets"),
    [
        (DATABASE_URL, BROKER_URL, ["db-s3cret", "mq-s3cr%40t", "mq-s3cr@t"]),
        # Only the registry finds where these passwords end.
        (
            "postgresql://relay:pa ss@word@db/app",
            "amqp://guest:we/ird?pw@mq//",
            ["pa ss@word", "we/ird?pw"],
        ),
        ("postgresql://app@db/app?password=query-s3cret", BROKER_URL, ["query-s3cret"]),
    ],
)
def test_no_password_in_the_repr_or_str_of_the_settings(
    database_url: str, broker_url: str, secrets: list[str]
) -> None:
    settings = config.load({"database_url": database_url, "broker_url": broker_url}, "relay", {})
    for text in (repr(settings), str(settings), repr(settings.database), repr(settings.broker)):
        assert "***" in text
        for secret in secrets:
            assert secret not in text
    # The value itself is intact where it is used.
    assert settings.database.url == database_url
    assert f"{settings.broker.url}" == broker_url


def test_url_fields_redact_also_when_built_directly() -> None:
    """An embedding application builds the types itself; nothing resolved its secrets."""
    clear_secrets()
    broker = BrokerSettings(url="amqp://guest:direct-s3cret@mq//", exchange="outbox")
    database = config.DatabaseSettings(
        url="postgresql://relay:direct-db-s3cret@db/app", listen=True, prepared_statements=True
    )
    assert isinstance(broker.url, SecretUrl) and isinstance(database.url, SecretUrl)
    assert "direct-s3cret" not in repr(broker)
    assert "direct-db-s3cret" not in repr(database)
    assert repr(broker.url) == "'amqp://guest:***@mq//'"
