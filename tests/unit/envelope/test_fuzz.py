"""Fuzzing: whatever an operator or another writer supplies yields a value or an OutboxError.

Envelope decoding (``Envelope.from_json``, ``check_envelope``), the relay's
handling of arbitrary row payloads, and settings parsing (``settings.resolve``).
Each test counts the cases it tried and prints the count (run with ``-s`` to
see it; hypothesis' own ``--hypothesis-show-statistics`` works too). The
default run is short; ``OUTBOX_FUZZ_SCALE=20`` multiplies every example count
for a deeper search.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, insert, select

from outbox.cli import settings as config
from outbox.envelope.model import Envelope
from outbox.envelope.validation import check_envelope
from outbox.errors import ConfigurationError, EnvelopeError, OutboxError
from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.preparing import parse_payload
from outbox.relay.publisher import open_publisher
from outbox.store import migrate, table
from outbox.store.engine import create_outbox_engine
from outbox.store.sqlstore import SqlStore

# Nested just below json's own depth limit, so that they decode and reach the validator.
DEEP_CONTENT = (
    '{"action": "update", "resource": {"schema": "https://example.org/s.json", "content": '
    + '{"a": [' * 450
    + "1"
    + "]}" * 450
    + "}}"
)
DEEP_ACTION = '{"action": ' + "[" * 900 + "]" * 900 + ', "resource": {}}'
NAN_CONTENT = (
    '{"action": "create", "resource": {"schema": "https://example.org/s.json", '
    '"content": {"n": NaN}}}'
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
actions = st.sampled_from(["create", "update", "delete"]) | st.text(max_size=8) | json_scalars
schemas = st.sampled_from(["https://example.org/s.json", "urn:x:y", "", "not a uri"]) | st.text(
    max_size=30
)
# Envelope-shaped documents with a fuzzed field here and there: these reach
# deeper than random JSON.
envelope_like = st.fixed_dictionaries(
    {
        "action": actions,
        "resource": st.fixed_dictionaries({"schema": schemas, "content": json_values})
        | json_values,
    },
    optional={"extra": json_values},
)
documents = envelope_like | json_values
texts = (
    documents.map(lambda d: json.dumps(d))
    | st.text(max_size=200)
    | st.sampled_from(["[" * 3000, '{"a":' * 2000, "NaN", "-Infinity", "\ufeff{}"])
    | st.sampled_from([DEEP_CONTENT, DEEP_ACTION, NAN_CONTENT])
)

valid_envelopes = st.fixed_dictionaries(
    {
        "action": st.sampled_from(["create", "update", "delete"]),
        "resource": st.fixed_dictionaries(
            {
                "schema": st.just("https://example.org/schemas/case.json"),
                "content": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
            }
        ),
    }
).map(json.dumps)

tried: Counter[str] = Counter()
SCALE = float(os.environ.get("OUTBOX_FUZZ_SCALE", "1"))


def examples(default: int) -> int:
    return max(10, int(default * SCALE))


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print("\nfuzz cases tried:", dict(tried))


@settings(max_examples=examples(300), deadline=None)
@given(text=texts | st.binary(max_size=200))
def test_envelope_from_json_returns_an_envelope_or_raises_envelope_error(
    text: str | bytes,
) -> None:
    tried["Envelope.from_json"] += 1
    try:
        envelope = Envelope.from_json(text)
    except EnvelopeError:
        return
    assert envelope.action in ("create", "update", "delete")


@settings(max_examples=examples(200), deadline=None)
@given(document=documents)
def test_check_envelope_accepts_or_raises_envelope_error(document: Any) -> None:
    tried["check_envelope"] += 1
    try:
        check_envelope(document)
    except EnvelopeError as exc:
        assert str(exc).startswith("invalid envelope: ")
        return
    # Whatever the validator accepts, the value object can hold and write again.
    envelope = Envelope.from_dict(document)
    try:
        again = envelope.to_dict()
    except EnvelopeError:
        return  # e.g. NaN content: accepted by the schema, refused by the lossless codec
    check_envelope(again)


def _stdlib_parse(text: str) -> Any:
    def reject(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=reject)


@settings(max_examples=examples(500), deadline=None)
@given(
    text=texts
    | st.integers().map(str)
    | st.floats().map(lambda f: json.dumps([f]))
    # Valid for the stdlib, refused by orjson: the fallback must take them.
    | st.sampled_from(['"\\ud800"', '{"a":["\\udfff"]}', str(2**80), "1e400"])
)
def test_relay_parser_accepts_exactly_what_the_stdlib_accepts(text: str) -> None:
    tried["relay parser"] += 1
    try:
        expected: Any = _stdlib_parse(text)
    except (ValueError, RecursionError):
        with pytest.raises((ValueError, RecursionError)):
            parse_payload(text)
        return
    got = parse_payload(text)
    # Equal values; orjson reads an integer beyond 64 bits as a float.
    assert got == expected or json.dumps(got) == json.dumps(_as_floats(expected))


def _as_floats(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    return value


# -- the relay, given rows written by other code ------------------------------


@pytest.fixture
def relay_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_outbox_engine(f"sqlite:///{tmp_path / 'fuzz.db'}")
    migrate.upgrade(engine, partitions=1)
    yield engine
    engine.dispose()


def test_relay_delivers_or_marks_dead_any_row_payload(relay_engine: Engine) -> None:
    store = SqlStore(relay_engine)
    publisher = open_publisher("memory://", f"fuzz-{uuid.uuid4().hex[:8]}", allow_in_process=True)
    relay = Relay(store, publisher, RelaySettings(batch_size=10, lease_ttl=30))
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=examples(60),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=texts | valid_envelopes)
    def relay_one(payload: str) -> None:
        tried["relay row payload"] += 1
        key = uuid.uuid4().hex
        with relay_engine.begin() as connection:
            position = connection.execute(
                insert(table.event)
                .values(
                    event_id=uuid.uuid4(),
                    ordering_key=key,
                    partition=0,
                    routing_key="fuzz.update",
                    resource_type="fuzz",
                    payload=payload,
                )
                .returning(table.event.c.position)
            ).scalar_one()
        relay.drain(timeout=10)
        with relay_engine.connect() as connection:
            state, last_error = connection.execute(
                select(table.event.c.state, table.event.c.last_error).where(
                    table.event.c.position == position
                )
            ).one()
        outcomes[state] += 1
        valid = _is_valid_envelope(payload)
        # Nothing is lost or left behind: delivered when valid, dead (with a reason) otherwise.
        assert state == (table.DELIVERED if valid else table.DEAD), (state, last_error)
        if state == table.DEAD:
            assert last_error

    relay_one()
    print("\nrelay outcomes:", dict(outcomes))
    assert outcomes[table.DELIVERED] > 0 and outcomes[table.DEAD] > 0


def _is_valid_envelope(payload: str) -> bool:
    def strict(name: str) -> None:
        raise ValueError(name)

    try:
        check_envelope(json.loads(payload, parse_constant=strict))
    except (ValueError, RecursionError, OutboxError):
        return False
    return True


# -- settings -------------------------------------------------------------------

setting_names = st.sampled_from([s.name for s in config.SETTINGS])
commands = st.sampled_from(["relay", "demo", "migrate", "status", "check"])
raw_values = (
    st.text(max_size=40)
    | st.sampled_from(["0", "-1", "1e999", "nan", "inf", "1_000", "  5 ", "true", "off", "/"])
    | st.integers().map(str)
    | st.floats().map(str)
)


def _environ(names: list[str], values: list[str], file_names: list[str]) -> dict[str, str]:
    environ = {f"OUTBOX_{n.upper()}": v for n, v in zip(names, values, strict=False)}
    environ.update(
        {f"OUTBOX_{n.upper()}_FILE": v for n, v in zip(file_names, values, strict=False)}
    )
    return environ


@settings(max_examples=examples(300), deadline=None)
@given(
    flags=st.dictionaries(setting_names, raw_values | st.none(), max_size=4),
    env_names=st.lists(setting_names | st.just("secrets_dir"), max_size=4),
    env_values=st.lists(raw_values, min_size=4, max_size=4),
    file_names=st.lists(setting_names, max_size=2),
    command=commands,
)
def test_resolve_returns_settings_or_raises_configuration_error(
    flags: dict[str, str | None],
    env_names: list[str],
    env_values: list[str],
    file_names: list[str],
    command: str,
) -> None:
    tried["settings.resolve"] += 1
    environ = _environ(env_names, env_values, file_names)
    try:
        values = config.resolve(flags, command, environ)
    except ConfigurationError as exc:
        assert str(exc)
        return
    for setting in config.SETTINGS:
        if not config.applies_to(setting, command):
            assert setting.name not in values
            continue
        value = values[setting.name]
        if isinstance(setting.default, float) and value is not None:
            assert isinstance(value, float) and 0 < value < float("inf")
        if isinstance(setting.default, int) and not isinstance(setting.default, bool):
            assert (isinstance(value, int) and value > 0) or value == setting.default
