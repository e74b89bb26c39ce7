"""The hot queries' array literals mean, to PostgreSQL's own parser, exactly the values given."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.store.pgfast import int_array, uuid_array
from tests.conftest import pg_url

BIGINT = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@pytest.fixture(scope="module")
def connection() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url("test"), autocommit=True) as conn:
        yield conn


@settings(max_examples=200, deadline=None)
@given(st.lists(BIGINT, max_size=50))
def test_bigints_round_trip(connection: psycopg.Connection[Any], values: list[int]) -> None:
    row = connection.execute("SELECT %s::bigint[]", (int_array(values),)).fetchone()
    assert row is not None and row[0] == values


@settings(max_examples=100, deadline=None)
@given(st.lists(st.uuids(), max_size=20))
def test_uuids_round_trip(connection: psycopg.Connection[Any], values: list[uuid.UUID]) -> None:
    texts = [str(value) for value in values]
    row = connection.execute("SELECT %s::uuid[]", (uuid_array(texts),)).fetchone()
    assert row is not None and row[0] == values


def test_a_position_beyond_bigint_is_refused_by_the_server(
    connection: psycopg.Connection[Any],
) -> None:
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        connection.execute("SELECT %s::bigint[]", (int_array([2**63]),))


@pytest.mark.parametrize(
    "text",
    [
        "a,b",  # would split into two elements
        '"x"',
        "{1}",
        "1 2",
        "NULL",
        "",
        "0f\u00e9",
    ],
)
def test_what_is_not_uuid_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="UUIDs as text"):
        uuid_array([str(uuid.uuid4()), text])


def test_what_is_not_an_integer_is_refused() -> None:
    with pytest.raises((ValueError, TypeError)):
        int_array(["1,2"])  # type: ignore[list-item]
