"""The one JSON reader (outbox.envelope.jsontext.parse_json) and the places that use it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.consumer import decode
from outbox.envelope.jsontext import parse_json
from outbox.envelope.model import Envelope
from outbox.errors import EnvelopeError
from outbox.relay.message import stored_headers

ENVELOPE = '{"action": "create", "resource": {"schema": "urn:x:y", "content": %s}}'


def _stdlib(text: str | bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


json_text = (
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=10,
    ).map(json.dumps)
    | st.text(max_size=40)
    | st.sampled_from(['"\\ud800"', str(2**80), "-1e400", "[" * 3000, "NaN", "\ufeff{}"])
)


@settings(max_examples=300, deadline=None)
@given(text=json_text)
def test_both_ways_accept_exactly_what_the_stdlib_accepts_without_constants(text: str) -> None:
    try:
        expected = _stdlib(text)
    except (ValueError, RecursionError):
        for exact in (True, False):
            with pytest.raises(ValueError):
                parse_json(text, exact_integers=exact)
        return
    exact = parse_json(text)
    assert exact == expected or json.dumps(exact) == json.dumps(expected)  # NaN != NaN
    parse_json(text, exact_integers=False)  # accepted too (big integers as floats)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_by_name(constant: str) -> None:
    for exact in (True, False):
        with pytest.raises(ValueError, match=f"{constant} is not a JSON value"):
            parse_json(f'{{"n": {constant}}}', exact_integers=exact)


def test_integers_beyond_64_bits_are_exact_unless_asked_otherwise() -> None:
    assert parse_json(str(2**70)) == 2**70
    assert parse_json(str(2**70), exact_integers=False) == float(2**70)


def test_bytes_are_read_in_every_encoding_the_stdlib_detects() -> None:
    for encoding in ("utf-8", "utf-16", "utf-32"):
        assert parse_json('{"a": "é"}'.encode(encoding), exact_integers=False) == {"a": "é"}
        assert parse_json('{"a": "é"}'.encode(encoding)) == {"a": "é"}


def test_too_deep_nesting_is_a_value_error() -> None:
    for exact in (True, False):
        with pytest.raises(ValueError, match="depth limit exceeded"):
            parse_json("[" * 5000 + "]" * 5000, exact_integers=exact)


def test_envelopes_and_messages_refuse_what_the_reader_refuses() -> None:
    with pytest.raises(EnvelopeError, match="envelope is not valid JSON: NaN is not a JSON value"):
        Envelope.from_json(ENVELOPE % '{"n": NaN}')
    with pytest.raises(EnvelopeError, match="envelope is not valid JSON: depth limit"):
        Envelope.from_json(ENVELOPE % ("[" * 5000 + "]" * 5000))
    with pytest.raises(EnvelopeError, match="message body is not JSON: Infinity is not a JSON"):
        decode((ENVELOPE % '{"n": Infinity}').encode("utf-8"))
    with pytest.raises(EnvelopeError, match="message body is not JSON: depth limit"):
        decode(ENVELOPE % ("[" * 5000 + "]" * 5000))
    big = Envelope.from_json(ENVELOPE % f'{{"id": {2**70}}}')
    assert big.content == {"id": 2**70}  # exact in the value object and for consumers


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('{"\\udfff": "v"}', "lone surrogate"),
        ('{"a": {"\\udfff": 1}}', "lone surrogate"),
        ('{"a": 1e400}', "inf is not a finite number"),
        ('{"a": [-1e400]}', "-inf is not a finite number"),
        ('{"a": NaN}', "NaN is not a JSON value"),
        (f'{{"a": {2**64}}}', "does not fit in 64 bits"),
        (f'{{"a": [{-(2**63) - 1}]}}', "does not fit in 64 bits"),
    ],
)
def test_stored_headers_refuse_what_a_header_frame_cannot_carry(headers: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        stored_headers(headers)


def test_stored_headers_keep_what_a_header_frame_carries() -> None:
    text = (
        '{"traceparent": "00-ab", "n": [1, 2.5, "é"], "o": {"k": null}, "big": 9223372036854775807}'
    )
    assert stored_headers(text) == {
        "traceparent": "00-ab",
        "n": [1, 2.5, "é"],
        "o": {"k": None},
        "big": 2**63 - 1,
    }
