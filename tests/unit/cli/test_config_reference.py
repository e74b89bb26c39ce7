"""The configuration reference matches the code; secrets come from env, files or a directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from outbox.cli import settings as config
from outbox.cli.deploy import configuration_page
from outbox.cli.main import EXIT_USAGE, build_parser, main
from outbox.errors import ConfigurationError
from tests.paths import ROOT

DOCS = ROOT / "docs" / "configuration.md"


def test_docs_configuration_md_is_generated_from_the_settings() -> None:
    assert DOCS.read_text("utf-8") == configuration_page(), (
        "docs/configuration.md is out of date: run "
        "`outbox config-reference > docs/configuration.md`"
    )


def test_every_setting_is_documented_with_flag_env_and_default() -> None:
    text = DOCS.read_text("utf-8")
    for setting in config.SETTINGS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{setting.flag}` |"))
        assert f"`{setting.env}`" in row
        assert setting.help in row
        if setting.default is not None:
            assert f"`{setting.default}`" in row


def test_every_documented_flag_is_accepted_by_the_commands_it_names() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    for setting in config.SETTINGS:
        for name, sub in subcommands.items():
            flags = {f for a in sub._actions for f in a.option_strings}
            assert (setting.flag in flags) == config.applies_to(setting, name), (setting, name)


def test_config_reference_command_prints_the_page() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "config-reference"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == configuration_page()


# -- secrets from files -------------------------------------------------------


def test_secret_from_file_variable(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text("postgresql://relay:s3cret@db/app\n", "utf-8")
    values = config.resolve({}, "status", {"OUTBOX_DATABASE_URL_FILE": str(secret)})
    assert values["database_url"] == "postgresql://relay:s3cret@db/app"


def test_secret_from_secrets_directory(tmp_path: Path) -> None:
    (tmp_path / "database_url").write_text("postgresql://a@db/app\n", "utf-8")
    (tmp_path / "broker_url").write_text("amqp://u:p@mq//", "utf-8")
    values = config.resolve({}, "relay", {"OUTBOX_SECRETS_DIR": str(tmp_path)})
    assert values["database_url"] == "postgresql://a@db/app"
    assert values["broker_url"] == "amqp://u:p@mq//"
    # The flag form works too.
    values = config.resolve({"secrets_dir": str(tmp_path)}, "relay", {})
    assert values["broker_url"] == "amqp://u:p@mq//"


def test_secret_precedence_flag_env_file_directory(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / "database_url").write_text("sqlite:///from-dir.db", "utf-8")
    file = tmp_path / "db-url"
    file.write_text("sqlite:///from-file.db", "utf-8")
    environ = {"OUTBOX_SECRETS_DIR": str(directory)}

    def resolved(values: dict[str, str], extra: dict[str, str]) -> str:
        return str(config.resolve(values, "status", {**environ, **extra})["database_url"])

    assert resolved({}, {}) == "sqlite:///from-dir.db"
    assert resolved({}, {"OUTBOX_DATABASE_URL_FILE": str(file)}) == "sqlite:///from-file.db"
    assert (
        resolved(
            {}, {"OUTBOX_DATABASE_URL_FILE": str(file), "OUTBOX_DATABASE_URL": "sqlite:///env.db"}
        )
        == "sqlite:///env.db"
    )
    assert (
        resolved({"database_url": "sqlite:///flag.db"}, {"OUTBOX_DATABASE_URL": "sqlite:///e.db"})
        == "sqlite:///flag.db"
    )


def test_missing_file_in_secrets_directory_falls_back_to_default(tmp_path: Path) -> None:
    values = config.resolve({}, "status", {"OUTBOX_SECRETS_DIR": str(tmp_path)})
    assert values["database_url"] is None
    assert values["secrets_dir"] == str(tmp_path)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OUTBOX_DATABASE_URL_FILE": "/nonexistent/db-url"}, "OUTBOX_DATABASE_URL_FILE"),
        ({"OUTBOX_DATABASE_URL_FILE": "/tmp/\x00"}, "OUTBOX_DATABASE_URL_FILE"),
        ({"OUTBOX_SECRETS_DIR": "/nonexistent/secrets"}, "OUTBOX_SECRETS_DIR"),
        ({"OUTBOX_BROKER_SSL_CA": "/nonexistent/ca.pem"}, "OUTBOX_BROKER_SSL_CA"),
        ({"OUTBOX_POLL_INTERVAL": "nan"}, "OUTBOX_POLL_INTERVAL"),
        ({"OUTBOX_POLL_INTERVAL": "inf"}, "OUTBOX_POLL_INTERVAL"),
    ],
)
def test_bad_secret_sources_are_configuration_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        config.resolve({}, "relay", environ)


def test_secret_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_bytes(b"\xff\xfe postgresql://")
    with pytest.raises(ConfigurationError, match="OUTBOX_DATABASE_URL_FILE"):
        config.resolve({}, "status", {"OUTBOX_DATABASE_URL_FILE": str(secret)})
    with pytest.raises(ConfigurationError, match="OUTBOX_SECRETS_DIR"):
        config.resolve({}, "status", {"OUTBOX_SECRETS_DIR": str(tmp_path)})


def test_secret_from_file_is_not_echoed_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "broker_url"
    secret.write_text("amqp://user:hunter2@mq:5672//", "utf-8")
    for name in [n for n in os.environ if n.startswith("OUTBOX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OUTBOX_BROKER_URL_FILE", str(secret))
    assert main(["relay"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "--database-url (or OUTBOX_DATABASE_URL) is required" in captured.err
    assert "hunter2" not in captured.out + captured.err
