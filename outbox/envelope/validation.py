"""Validation of envelopes against the shipped event schema.

Producers call it before writing a row and the relay calls it again before
forwarding, because rows may be written by other code.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from outbox.errors import EnvelopeError


@cache
def event_schema() -> dict[str, Any]:
    """The corrected event schema (draft 2020-12) shipped in the package."""
    text = resources.files("outbox.envelope").joinpath("event.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> Draft202012Validator:
    schema = event_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker(["uri"]))


def describe(error: ValidationError) -> str:
    """One line: where in the document, and what is wrong."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"{where.lstrip('.') or '(root)'}: {error.message}"


def check_envelope(data: Any) -> None:
    """Raise :class:`EnvelopeError` unless ``data`` matches the event schema."""
    validator = _validator()
    if validator.is_valid(data):
        return
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    raise EnvelopeError("invalid envelope: " + "; ".join(describe(e) for e in errors))
