"""The schema registry: resource schemas by URI and version, and content validation.

Envelopes name the schema of their content in ``resource.schema``. The
registry maps that URI to the versions registered for it (JSON Schema draft
2020-12 documents or Avro schemas), stored in ``outbox_schema``:

- registering the same document again is a no-op; a changed document becomes
  the next version, once it passed the compatibility check (:mod:`outbox.schemas.compat`);
- ``<uri>`` means the latest version; ``<uri>/<n>`` (when ``<uri>`` is
  registered and ``<uri>/<n>`` itself is not) pins version ``n``;
- validators are compiled once per (uri, version) and cached.

Producers and the relay both call :meth:`SchemaRegistry.check_content`, so the
rules are the same on both sides. Without an engine the registry lives in
memory only (consumers with local schema files, tests).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError as JsonSchemaError
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from outbox.envelope import validation
from outbox.errors import (
    ConfigurationError,
    ContentValidationError,
    SchemaError,
)
from outbox.logs import emit
from outbox.schemas import compat
from outbox.store import table
from outbox.store.driver_errors import store_error

if TYPE_CHECKING:
    from outbox.store.rows import EventRow

# Gives the connection to read the registry through, only when a reload is due.
ConnectionSource = Callable[[], Connection]

log = logging.getLogger(__name__)

JSONSCHEMA = "jsonschema"
AVRO = "avro"
FORMATS = (JSONSCHEMA, AVRO)
DEFAULT_COMPATIBILITY = "backward"
_AVRO_NAMED_TYPES = ("record", "enum", "fixed")
# Advisory lock namespace for registrations (PostgreSQL): one writer per URI at a time.
_REGISTER_LOCK = 0x5C4E

Check = Callable[[Any], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class SchemaVersion:
    """One registered version of a resource schema."""

    uri: str
    version: int
    format: str
    document: Any  # the parsed JSON document
    fingerprint: str  # sha256 hex of the canonical form
    registered_at: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> SchemaVersion:
        """A version as ``outbox_schema`` stores it (the document as JSON text)."""
        return cls(
            uri=row.uri,
            version=row.version,
            format=row.format,
            document=json.loads(row.document),
            fingerprint=row.fingerprint,
            registered_at=row.registered_at,
        )

    def to_dict(self, *, with_document: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "uri": self.uri,
            "version": self.version,
            "format": self.format,
            "fingerprint": self.fingerprint,
            "registered_at": self.registered_at.isoformat() if self.registered_at else None,
        }
        if with_document:
            data["document"] = self.document
        return data


def detect_format(document: Any, path: str | Path | None = None) -> str:
    """``avro`` for ``.avsc`` files and Avro-shaped documents, else ``jsonschema``."""
    if path is not None and str(path).endswith(".avsc"):
        return AVRO
    if isinstance(document, list):
        return AVRO  # a top-level union
    is_avro_named_type = (
        isinstance(document, Mapping)
        and "$schema" not in document
        and document.get("type") in _AVRO_NAMED_TYPES
        and "name" in document
    )
    return AVRO if is_avro_named_type else JSONSCHEMA


def avro_module() -> ModuleType:
    """:mod:`outbox.schemas.avro`, or a clear error when fastavro (extra ``avro``) is missing."""
    try:
        from outbox.schemas import avro
    except ImportError as exc:  # pragma: no cover - fastavro is installed with the test extras
        raise ConfigurationError(
            f"Avro schemas need fastavro: pip install 'outbox[avro]' ({exc})"
        ) from None
    return avro


def _canonical_json(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint_of(document: Any, format: str) -> str:
    """sha256 of the canonical form: Avro's Parsing Canonical Form, or sorted compact JSON."""
    if format == AVRO:
        fingerprint: str = avro_module().sha256_fingerprint(document)
        return fingerprint
    return hashlib.sha256(_canonical_json(document).encode("utf-8")).hexdigest()


def check_document(document: Any, format: str) -> None:
    """Raise :class:`SchemaError` unless ``document`` is a valid schema of ``format``."""
    if format == AVRO:
        avro = avro_module()
        avro.parse(document)
        return
    if format != JSONSCHEMA:
        raise SchemaError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(document, Mapping | bool):
        raise SchemaError("a JSON Schema must be an object")
    try:
        Draft202012Validator.check_schema(document)
    except JsonSchemaError as exc:
        raise SchemaError(f"not a valid JSON Schema: {exc.message}") from None


def incompatibilities(old: SchemaVersion, new: Any, mode: str) -> list[compat.Incompatibility]:
    """Why ``new`` (a document of the same format) cannot follow ``old`` under ``mode``."""
    if mode == "none":
        return []
    if old.format == AVRO:
        avro = avro_module()
        old_parsed, old_named = avro.parse(old.document)
        new_parsed, new_named = avro.parse(new)
        return compat.avro_incompatibilities(
            old_parsed, new_parsed, mode, named_old=old_named, named_new=new_named
        )
    return compat.jsonschema_incompatibilities(old.document, new, mode)


def _fast_validator(document: Any) -> Callable[[Any], bool] | None:
    """jsonschema-rs's ``is_valid`` (about 50 times faster), when it is installed and compiles."""
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - it is a dependency, but only an accelerator
        return None
    try:
        is_valid: Callable[[Any], bool] = jsonschema_rs.Draft202012Validator(document).is_valid
    except Exception:  # a schema it cannot compile (remote $ref...): python-jsonschema alone
        return None
    return is_valid


@dataclass
class _Snapshot:
    by_uri: dict[str, list[SchemaVersion]] = field(default_factory=dict)
    by_crc64: dict[bytes, SchemaVersion] = field(default_factory=dict)


class SchemaRegistry:
    """Schemas by URI and version, over ``outbox_schema`` (or in memory when ``engine`` is None).

    ``max_age``: seconds a loaded copy is trusted before it is reloaded, so that
    a version registered by another process becomes "the latest" here too;
    an unknown URI or version also triggers a reload, at most every
    ``miss_interval`` seconds.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        compatibility: str = DEFAULT_COMPATIBILITY,
        max_age: float = 30.0,
        miss_interval: float = 1.0,
    ) -> None:
        if compatibility not in compat.MODES:
            raise SchemaError(f"compatibility must be one of {', '.join(compat.MODES)}")
        self.engine = engine
        self.compatibility = compatibility
        self.max_age = max_age
        self.miss_interval = miss_interval
        self._snapshot = _Snapshot()
        self._loaded_at: float | None = None
        self._last_miss = float("-inf")
        self._lock = threading.Lock()
        self._checks: dict[tuple[str, int], Check] = {}
        self._parsed_avro: dict[tuple[str, int], Any] = {}
        self._unregistered_logged: set[str] = set()

    @classmethod
    def from_files(cls, *paths: str | Path, compatibility: str = "none") -> SchemaRegistry:
        """An in-memory registry of local schema files (each needs ``$id`` for its URI)."""
        registry = cls(compatibility=compatibility)
        for path in paths:
            registry.register_file(path)
        return registry

    # -- loading ------------------------------------------------------------------

    def refresh(self, using: ConnectionSource | None = None) -> None:
        """Reload every version from the database (no-op in memory).

        ``using`` gives the connection to read through (a producer's, inside
        its transaction: no second connection from the pool); by default the
        registry connects itself.
        """
        if self.engine is None:
            return
        S = table.schema
        query = select(S).order_by(S.c.uri, S.c.version)
        try:
            if using is not None:
                rows = list(using().execute(query))
            else:
                with self.engine.connect() as connection:
                    rows = list(connection.execute(query))
        except SQLAlchemyError as exc:
            raise store_error(exc) from exc
        snapshot = _Snapshot()
        for row in rows:
            snapshot.by_uri.setdefault(row.uri, []).append(SchemaVersion.from_row(row))
        self._install(snapshot)

    def _install(self, snapshot: _Snapshot) -> None:
        for versions in snapshot.by_uri.values():
            for version in versions:
                if version.format == AVRO:
                    avro = avro_module()
                    snapshot.by_crc64.setdefault(avro.crc64_fingerprint(version.document), version)
        with self._lock:
            self._snapshot = snapshot
            self._loaded_at = time.monotonic()

    def _fresh(self, using: ConnectionSource | None = None) -> _Snapshot:
        if self.engine is not None and (
            self._loaded_at is None or time.monotonic() - self._loaded_at > self.max_age
        ):
            self.refresh(using)
        return self._snapshot

    def _after_miss(self, using: ConnectionSource | None = None) -> _Snapshot | None:
        """Reload after a lookup missed, unless one happened very recently."""
        now = time.monotonic()
        if self.engine is None or now - self._last_miss < self.miss_interval:
            return None
        self._last_miss = now
        self.refresh(using)
        return self._snapshot

    # -- reading --------------------------------------------------------------------

    def uris(self) -> list[str]:
        return sorted(self._fresh().by_uri)

    def versions(self, uri: str) -> list[SchemaVersion]:
        return list(self._fresh().by_uri.get(uri, []))

    def latest(self) -> list[SchemaVersion]:
        """The latest version of every URI."""
        return [versions[-1] for _, versions in sorted(self._fresh().by_uri.items())]

    def resolve(
        self, uri: str, version: int | None = None, *, using: ConnectionSource | None = None
    ) -> SchemaVersion | None:
        """The version ``uri`` names (latest, or pinned by ``/<n>`` or ``version``), or None."""
        found = self._lookup(self._fresh(using), uri, version)
        if found is None:
            snapshot = self._after_miss(using)
            if snapshot is not None:
                found = self._lookup(snapshot, uri, version)
        return found

    def get(self, uri: str, version: int | None = None) -> SchemaVersion:
        found = self.resolve(uri, version)
        if found is None:
            which = f"{uri} version {version}" if version is not None else uri
            raise SchemaError(f"schema {which} is not registered")
        return found

    def by_fingerprint(self, crc64: bytes) -> SchemaVersion | None:
        """The Avro version whose CRC-64-AVRO fingerprint is ``crc64`` (single-object bodies)."""
        found = self._fresh().by_crc64.get(crc64)
        if found is None:
            snapshot = self._after_miss()
            found = snapshot.by_crc64.get(crc64) if snapshot is not None else None
        return found

    @staticmethod
    def _lookup(snapshot: _Snapshot, uri: str, version: int | None) -> SchemaVersion | None:
        versions = snapshot.by_uri.get(uri)
        if versions is None:
            base, _, last = uri.rpartition("/")
            if not last.isdigit() or base not in snapshot.by_uri:
                return None
            if version is not None and version != int(last):
                return None  # the URI pins one version, the row claims another
            versions, version = snapshot.by_uri[base], int(last)
        if version is None:
            return versions[-1]
        return next((v for v in versions if v.version == version), None)

    # -- validation -----------------------------------------------------------------

    def validator(self, schema: SchemaVersion) -> Check:
        """The compiled check of one version (cached)."""
        key = (schema.uri, schema.version)
        check = self._checks.get(key)
        if check is None:
            check = self._compile(schema)
            self._checks[key] = check
        return check

    def parsed_avro(self, schema: SchemaVersion) -> Any:
        """The fastavro-parsed schema of an Avro version (cached)."""
        key = (schema.uri, schema.version)
        parsed = self._parsed_avro.get(key)
        if parsed is None:
            avro = avro_module()
            parsed, _ = avro.parse(schema.document)
            self._parsed_avro[key] = parsed
        return parsed

    def _compile(self, schema: SchemaVersion) -> Check:
        if schema.format == AVRO:
            avro_check: Check = avro_module().validator(self.parsed_avro(schema))
            return avro_check
        compiled = Draft202012Validator(schema.document)
        fast = _fast_validator(schema.document)
        where = f"{schema.uri} version {schema.version}"

        def check(content: Any) -> None:
            # The fast validator answers valid/invalid; python-jsonschema has the
            # last word on a failure and explains it (it is the reference).
            if fast is not None and fast(content):
                return
            errors = sorted(compiled.iter_errors(content), key=lambda e: list(e.absolute_path))
            if not errors:
                return
            details = "; ".join(validation.describe(e) for e in errors)
            raise ContentValidationError(f"content does not match {where}: {details}")

        return check

    def check_content(
        self,
        uri: str,
        content: Any,
        *,
        version: int | None = None,
        strict: bool = False,
        using: ConnectionSource | None = None,
    ) -> SchemaVersion | None:
        """Validate ``content`` against the schema ``uri`` names; return the version used.

        An unregistered URI returns None (logged once per URI), or raises
        :class:`ContentValidationError` when ``strict``. ``using``: as for
        :meth:`refresh`, should the registry need a reload.
        """
        schema = self.resolve(uri, version, using=using)
        if schema is None:
            which = uri if version is None else f"{uri} version {version}"
            if strict:
                raise ContentValidationError(
                    f"schema {which} is not registered (strict schemas are on)"
                )
            if which not in self._unregistered_logged:
                self._unregistered_logged.add(which)
                emit(
                    log,
                    "schema_unregistered",
                    "schema %s is not registered; its content is not validated",
                    which,
                    level=logging.WARNING,
                    uri=uri,
                )
            return None
        try:
            self.validator(schema)(content)
        except ContentValidationError as exc:
            if schema.format == AVRO:
                raise ContentValidationError(
                    f"content does not match {schema.uri} version {schema.version}: {exc}"
                ) from None
            raise
        return schema

    # -- registration ---------------------------------------------------------------

    def register(
        self,
        uri: str,
        document: Any,
        *,
        format: str | None = None,
        compatibility: str | None = None,
    ) -> SchemaVersion:
        """Register ``document`` for ``uri``; the same document again returns its version.

        Raises :class:`SchemaError` when the document is not a valid schema, when
        its format differs from the previous version's, or when it is
        incompatible with the previous version (naming the field and rule).
        """
        if isinstance(document, str | bytes):
            try:
                document = json.loads(document)
            except ValueError as exc:
                raise SchemaError(f"{uri}: the schema is not valid JSON: {exc}") from None
        if not uri or uri.rpartition("/")[2].isdigit():
            raise SchemaError(
                f"{uri!r}: a schema URI must not end in /<number> (that form pins a version)"
            )
        format = format or detect_format(document)
        try:
            check_document(document, format)
        except SchemaError as exc:
            raise SchemaError(f"{uri}: {exc}") from None
        mode = compatibility or self.compatibility
        if self.engine is None:
            with self._lock:
                versions = self._snapshot.by_uri.get(uri, [])
                decided = self._decide(uri, document, format, mode, versions)
                if decided.version > (versions[-1].version if versions else 0):
                    snapshot = _Snapshot(
                        by_uri={**self._snapshot.by_uri, uri: [*versions, decided]}
                    )
                else:
                    return decided
            self._install(snapshot)
            self._log_registered(decided)
            return decided
        try:
            decided = self._register_in_database(uri, document, format, mode)
        except SQLAlchemyError as exc:
            raise store_error(exc) from exc
        self.refresh()
        return decided

    def register_file(
        self, path: str | Path, *, uri: str | None = None, compatibility: str | None = None
    ) -> SchemaVersion:
        """Register a ``.json`` (JSON Schema) or ``.avsc`` (Avro) file.

        The URI is ``uri``, else the document's ``$id`` (allowed in Avro
        schemas too, where it is an ignored extra attribute).
        """
        try:
            document = json.loads(Path(path).read_text("utf-8"))
        except OSError as exc:
            raise SchemaError(f"{path}: cannot read: {exc.strerror}") from None
        except ValueError as exc:
            raise SchemaError(f"{path}: not valid JSON: {exc}") from None
        uri = uri or (document.get("$id") if isinstance(document, Mapping) else None)
        if not uri:
            raise SchemaError(f"{path}: no URI: give one (--uri) or put it in the document's $id")
        try:
            return self.register(
                uri, document, format=detect_format(document, path), compatibility=compatibility
            )
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}") from None

    def _decide(
        self, uri: str, document: Any, format: str, mode: str, versions: list[SchemaVersion]
    ) -> SchemaVersion:
        """The existing version equal to ``document``, or the next one after the checks."""
        previous = versions[-1] if versions else None
        for existing in versions:
            if existing.format == format and existing.document == document:
                return existing
        if previous is not None:
            if previous.format != format:
                raise SchemaError(
                    f"{uri}: version {previous.version} is {previous.format}; "
                    f"a new version cannot be {format}"
                )
            problems = incompatibilities(previous, document, mode)
            if problems:
                details = "; ".join(str(p) for p in problems)
                raise SchemaError(
                    f"{uri}: incompatible with version {previous.version} "
                    f"under {mode} compatibility: {details}"
                )
        return SchemaVersion(
            uri=uri,
            version=(previous.version if previous else 0) + 1,
            format=format,
            document=document,
            fingerprint=fingerprint_of(document, format),
            registered_at=dt.datetime.now(dt.UTC),
        )

    def _register_in_database(
        self, uri: str, document: Any, format: str, mode: str
    ) -> SchemaVersion:
        assert self.engine is not None
        S = table.schema
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:ns, hashtext(:uri))"),
                    {"ns": _REGISTER_LOCK, "uri": uri},
                )
            rows = connection.execute(
                select(S).where(S.c.uri == uri).order_by(S.c.version)
            ).fetchall()
            versions = [SchemaVersion.from_row(r) for r in rows]
            decided = self._decide(uri, document, format, mode, versions)
            if versions and decided.version <= versions[-1].version:
                return decided
            try:
                connection.execute(
                    S.insert().values(
                        uri=uri,
                        version=decided.version,
                        format=format,
                        document=json.dumps(document, indent=2, ensure_ascii=False),
                        fingerprint=decided.fingerprint,
                        registered_at=func.now(),
                    )
                )
            except IntegrityError:
                raise SchemaError(
                    f"{uri}: version {decided.version} was registered concurrently; retry"
                ) from None
        self._log_registered(decided)
        return decided

    @staticmethod
    def _log_registered(schema: SchemaVersion) -> None:
        emit(
            log,
            "schema_registered",
            "registered %s version %d (%s)",
            schema.uri,
            schema.version,
            schema.format,
            uri=schema.uri,
            version=schema.version,
            format=schema.format,
        )

    def register_all(self, paths: Iterable[str | Path]) -> list[SchemaVersion]:
        return [self.register_file(p) for p in paths]


# -- the relay's side ---------------------------------------------------------------


def content_validator(
    registry: SchemaRegistry, *, strict: bool = False
) -> Callable[[EventRow, dict[str, Any]], None]:
    """The relay's ``content_validator``: re-check each row before it is forwarded.

    A row that recorded a schema version is checked against that version; one
    that did not (written by other code, or before the schema was registered)
    against the version its URI names now.
    """

    def check(row: EventRow, data: dict[str, Any]) -> None:
        resource = data["resource"]
        registry.check_content(
            resource["schema"], resource["content"], version=row.schema_version, strict=strict
        )

    return check


def relay_hooks(
    engine: Engine, *, validate: bool = True, strict: bool = False, body_format: str = "json"
) -> dict[str, Any]:
    """The Relay keyword arguments (``content_validator``, ``body_encoder``) for these settings."""
    if not validate and body_format == "json":
        return {}
    registry = SchemaRegistry(engine)
    hooks: dict[str, Any] = {}
    if validate:
        hooks["content_validator"] = content_validator(registry, strict=strict)
    if body_format == "avro":
        avro = avro_module()
        hooks["body_encoder"] = avro.body_encoder(registry)
    return hooks
