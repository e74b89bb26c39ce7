"""The schema registry commands: ``outbox schemas register|list|show``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from outbox.cli import settings as config
from outbox.cli.settings import Settings
from outbox.errors import ConfigurationError, SchemaError

CommandFactory = Callable[[str, str, Callable[..., int]], argparse.ArgumentParser]

EXIT_OK = 0
EXIT_REFUSED = 1


def add_commands(command: CommandFactory) -> None:
    """Register this module's sub-commands with ``command(name, help, run)``."""
    parser = command(
        "schemas", "register, list and show resource schemas (JSON Schema or Avro)", run
    )
    sub = parser.add_subparsers(dest="schemas_command", required=True, metavar="ACTION")
    register = _action(
        sub,
        "register",
        "register schema files (.json: JSON Schema, .avsc: Avro); a changed document "
        "becomes a new version once it passes the compatibility check",
        cmd_register,
    )
    register.add_argument("paths", nargs="+", metavar="PATH", help="schema files")
    register.add_argument(
        "--uri", help="the URI envelopes name the schema by (default: the document's $id)"
    )
    listing = _action(sub, "list", "list registered schemas (latest version of each)", cmd_list)
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    listing.add_argument("--all", action="store_true", help="every version, not only the latest")
    show = _action(sub, "show", "print a registered schema", cmd_show)
    show.add_argument("uri", metavar="URI", help="schema URI (<uri>/<n> for version n)")
    show.add_argument("--version", type=int, default=None, help="version (default: latest)")


def _action(
    sub: Any, name: str, help: str, run: Callable[[Settings, argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    # The shared settings also after the action (`outbox schemas list --database-url ...`);
    # SUPPRESS keeps an absent flag from overwriting one given before the action.
    for setting in config.SETTINGS:
        if config.applies_to(setting, "schemas"):
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                default=argparse.SUPPRESS,
                metavar=setting.name.split("_")[-1].upper(),
                help=f"see `outbox schemas --help` [env: {setting.env}]",
            )
    parser.set_defaults(schemas_run=run)
    return parser


def run(settings: Settings, args: argparse.Namespace) -> int:
    action: Callable[[Settings, argparse.Namespace], int] = args.schemas_run
    return action(settings, args)


def _registry(settings: Settings) -> Any:
    from outbox.schemas.registry import SchemaRegistry
    from outbox.store.engine import create_outbox_engine

    url = config.require(settings.database.url, "database_url")
    compatibility = settings.schemas.compatibility or "backward"
    return SchemaRegistry(create_outbox_engine(url), compatibility=compatibility)


def cmd_register(settings: Settings, args: argparse.Namespace) -> int:
    if args.uri and len(args.paths) > 1:
        raise ConfigurationError("--uri names one schema: register one PATH with it")
    registry = _registry(settings)
    code = EXIT_OK
    try:
        known = {(v.uri, v.version) for uri in registry.uris() for v in registry.versions(uri)}
        for path in args.paths:
            try:
                schema = registry.register_file(path, uri=args.uri)
            except SchemaError as exc:
                print(f"outbox: refused: {exc}", file=sys.stderr)
                code = EXIT_REFUSED
                continue
            outcome = "unchanged" if (schema.uri, schema.version) in known else "registered"
            known.add((schema.uri, schema.version))
            print(f"{outcome} {schema.uri} version {schema.version} ({schema.format})")
    finally:
        registry.engine.dispose()
    return code


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    registry = _registry(settings)
    try:
        if args.all:
            schemas = [v for uri in registry.uris() for v in registry.versions(uri)]
        else:
            schemas = registry.latest()
    finally:
        registry.engine.dispose()
    if args.json:
        print(json.dumps([s.to_dict() for s in schemas]))
        return EXIT_OK
    for s in schemas:
        print(f"{s.uri}  version {s.version}  {s.format}  {s.fingerprint[:16]}")
    return EXIT_OK


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    registry = _registry(settings)
    try:
        schema = registry.get(args.uri, args.version)
    finally:
        registry.engine.dispose()
    print(json.dumps(schema.to_dict(with_document=True), indent=2, ensure_ascii=False))
    return EXIT_OK
