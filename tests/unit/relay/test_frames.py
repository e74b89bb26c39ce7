"""The relay's own AMQP frames are byte for byte what py-amqp would write."""

from __future__ import annotations

import datetime as dt
import decimal
import struct
from typing import Any

from amqp import Message, spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.relay.frames import PublishEncoder, encode_table, write_batch
from outbox.relay.message import LEADING_HEADERS, OutgoingMessage, build_message
from outbox.store.rows import EventRow


class _Capture:
    """What py-amqp's frame writer needs from a connection and a transport."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


def reference_frames(message: OutgoingMessage, *, exchange: str, frame_max: int) -> bytes:
    """py-amqp's bytes for the same publish (as Channel.basic_publish sends it)."""
    capture = _Capture(frame_max)
    write_frame = frame_writer(capture, capture)
    args = dumps("Bssbb", (0, exchange, message.routing_key, True, False))
    content = Message(
        message.body,
        content_type=message.content_type,
        delivery_mode=2,
        message_id=message.message_id,
        timestamp=int(message.timestamp.timestamp()),
        application_headers=message.headers,
    )
    write_frame(1, 1, spec.Basic.Publish, args, content)
    return b"".join(capture.written)


def outgoing(
    headers: dict[str, Any], body: bytes, routing_key: str = "case.update"
) -> OutgoingMessage:
    return OutgoingMessage(
        position=1,
        message_id="0b6cbd8e-5d5e-4bb0-9f0e-3f3c2b8a1d22",
        routing_key=routing_key,
        body=body,
        content_type="application/json",
        timestamp=dt.datetime(2026, 11, 26, 21, 0, 0, 123456, tzinfo=dt.UTC),
        headers=headers,
    )


header_values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
    st.none(),
    st.binary(max_size=20),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    st.lists(st.integers(min_value=-1000, max_value=1000), max_size=3),
    st.decimals(places=2, min_value=-1000, max_value=1000, allow_nan=False),
)
header_keys = st.text(max_size=30).filter(lambda k: len(k.encode("utf-8", "surrogatepass")) < 256)


@settings(max_examples=150, deadline=None)
@given(
    headers=st.dictionaries(header_keys, header_values, max_size=12),
    body=st.binary(max_size=3000),
    routing_key=st.text(min_size=1, max_size=50),
)
def test_frames_equal_py_amqp(headers: dict[str, Any], body: bytes, routing_key: str) -> None:
    message = outgoing(headers, body, routing_key)
    # A small frame_max forces bodies over several body frames too.
    for frame_max in (131072, 1024):
        encoder = PublishEncoder(channel_id=1, exchange="outbox", frame_max=frame_max)
        expected = reference_frames(message, exchange="outbox", frame_max=frame_max)
        assert encoder.encode(message) == expected


def test_relay_headers_and_a_one_kib_body_equal_py_amqp() -> None:
    headers = {
        "outbox-action": "update",
        "outbox-key": "case:1:7",
        "ce-specversion": "1.0",
        "ce-time": "2026-11-26T21:00:00.123456Z",
        "outbox-schema-version": 3,
        "big": 2**40,
        "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "price": decimal.Decimal("12.50"),
    }
    message = outgoing(headers, b"x" * 1024)
    encoder = PublishEncoder(channel_id=1, exchange="outbox", frame_max=131072)
    assert encoder.encode(message) == reference_frames(message, exchange="outbox", frame_max=131072)
    assert encode_table({}) == b"\x00\x00\x00\x00"


def test_write_batch_keeps_order_and_bytes() -> None:
    frames = [bytes([i]) * 1000 for i in range(10)]
    writes: list[bytes] = []
    write_batch(writes.append, frames, chunk_bytes=2500)
    assert b"".join(writes) == b"".join(frames)
    assert len(writes) == 4  # 3 + 3 + 3 + 1 frames


SHARED_ENCODER = PublishEncoder(channel_id=1, exchange="outbox", frame_max=131072)


_LEADING_VALUE = st.one_of(
    st.sampled_from(["create", "update", "https://e.org/a.json", "ünïcode", ""]),
    st.integers(-(2**31), 2**31),
    st.lists(st.integers(0, 9), max_size=2),  # unhashable: not the relay's shape
)


@settings(max_examples=300, deadline=None)
@given(
    leading=st.lists(_LEADING_VALUE, min_size=len(LEADING_HEADERS), max_size=len(LEADING_HEADERS)),
    names=st.sampled_from([LEADING_HEADERS, LEADING_HEADERS[::-1], LEADING_HEADERS[:-1]]),
    own=st.dictionaries(st.sampled_from(["outbox-key", "ce-id", "ce-time", "x"]), st.text()),
)
def test_memoised_leading_headers_encode_as_py_amqp(
    leading: list[Any], names: tuple[str, ...], own: dict[str, Any]
) -> None:
    # One encoder across all examples: leading parts memoised by earlier messages are reused,
    # and a table in another order or with other values must not pick them up.
    headers: dict[str, Any] = dict(zip(names, leading, strict=False))
    headers.update({k: v for k, v in own.items() if k not in headers})
    message = outgoing(headers, b"{}")
    expected = reference_frames(message, exchange="outbox", frame_max=131072)
    assert SHARED_ENCODER.encode(message) == expected


def test_py_amqp_still_has_the_private_parts_the_encoder_relies_on() -> None:
    """py-amqp's ``_write_item`` is private: the range is pinned, and its shape checked here."""
    import inspect
    import io

    from amqp import Connection, serialization

    assert list(inspect.signature(serialization._write_item).parameters) == ["v", "write", "bits"]
    out = io.BytesIO()
    serialization._write_item(1.5, out.write, [])
    assert out.getvalue() == b"d" + struct.pack(">d", 1.5)
    # The encoder writes whole batches of frames to the connection's transport.
    assert isinstance(Connection.transport, property)
    from amqp.transport import TCPTransport

    assert callable(TCPTransport.write)


def test_the_relays_messages_take_the_memoised_path() -> None:
    row = EventRow(
        position=1,
        event_id="0b6cbd8e-5d5e-4bb0-9f0e-3f3c2b8a1d22",
        ordering_key="case:1:1",
        partition=0,
        routing_key="case.update",
        resource_type="case",
        payload="{}",
        headers='{"x-trace": "abc"}',
        schema_version=4,
        created_at=dt.datetime(2026, 12, 2, tzinfo=dt.UTC),
        attempts=0,
    )
    message = build_message(row, "update", "https://e.org/case.json", source="/cases")
    assert tuple(message.headers)[: len(LEADING_HEADERS)] == LEADING_HEADERS
    encoder = PublishEncoder(channel_id=1, exchange="outbox", frame_max=131072)
    expected = reference_frames(message, exchange="outbox", frame_max=131072)
    assert encoder.encode(message) == expected
    assert encoder.encode(message) == expected  # the second time from the memo
    assert len(encoder._tables._leads) == 1
