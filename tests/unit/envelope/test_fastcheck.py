"""The relay's fast envelope check agrees with the jsonschema validator."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.envelope import fastcheck, validation
from outbox.errors import EnvelopeError

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
schemas = st.one_of(
    st.sampled_from(
        [
            "https://example.org/schemas/case.json",
            "urn:example:case",
            "case.json",
            "",
            "http://exa mple.org/",
            "https://example.org/a#b",
            "mailto:x@example.org",
            ":no-scheme",
        ]
    ),
    st.text(max_size=20),
    json_values,
)
actions = st.one_of(
    st.sampled_from(["create", "update", "delete", "Create", "remove"]), json_values
)
objects = st.dictionaries(st.text(max_size=5), json_values, max_size=3)
resources = st.one_of(
    st.fixed_dictionaries(
        {
            "schema": schemas,
            "content": st.one_of(
                st.dictionaries(st.text(max_size=5), json_values, max_size=3), json_values
            ),
        },
        optional={"extra": json_values},
    ),
    st.fixed_dictionaries({}, optional={"schema": schemas, "content": json_values}),
    json_values,
)
envelopes = st.one_of(
    st.fixed_dictionaries(
        {"action": actions, "resource": resources}, optional={"other": json_values}
    ),
    st.fixed_dictionaries({}, optional={"action": actions, "resource": resources}),
    json_values,
)


@settings(max_examples=500, deadline=None)
@given(envelopes)
def test_fast_check_equals_the_schema(document: Any) -> None:
    assert fastcheck.is_valid_envelope(document) == validation._validator().is_valid(document)


def test_valid_envelopes_pass_and_invalid_ones_explain() -> None:
    valid = {
        "action": "update",
        "resource": {"schema": "https://example.org/schemas/case.json", "content": {"id": 1}},
    }
    assert fastcheck.is_valid_envelope(valid)
    fastcheck.check_envelope(valid)
    with pytest.raises(EnvelopeError, match="action"):
        fastcheck.check_envelope({**valid, "action": "remove"})
    with pytest.raises(EnvelopeError, match="schema"):
        fastcheck.check_envelope({**valid, "resource": {"schema": "", "content": {}}})
