"""Helpers for the operations tests: a relay running in a thread, scraping, raw rows."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from outbox.cli import settings
from outbox.cli.runner import run_relay
from outbox.envelope import ordering
from outbox.store import table

SCHEMA = "https://example.org/schemas/case.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port_url() -> str:
    """An AMQP URL on a port nothing listens on: a broker outage without stopping RabbitMQ."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}//"


def relay_values(**overrides: str) -> settings.Settings:
    """The settings of `outbox relay` given these flags and no environment."""
    raw = {"poll_interval": "0.1", "metrics_interval": "0.2", "http_host": "127.0.0.1"}
    raw.update(overrides)
    return settings.load(raw, "relay", environ={})


@contextmanager
def running_relay(values: settings.Settings) -> Iterator[threading.Thread]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_relay(values, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the relay did not stop"
    assert not errors, errors


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as ``name{label="v",...}`` -> value."""
    status, text = get(port, "/metrics")
    if status != 200:
        return {}
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def publish_events(
    engine: Engine, key_id: int, versions: range, tenant: int = 1
) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    with Session(engine) as session, session.begin():
        for version in versions:
            ids.append(
                outbox.publish(
                    session,
                    outbox.Envelope(
                        action="update",
                        schema=SCHEMA,
                        content={"tenantId": tenant, "id": key_id, "version": version},
                    ),
                )
            )
    return ids


def insert_invalid_row(engine: Engine, key: str, payload: str = "{not json") -> uuid.UUID:
    """A row written by other code, bypassing validation: the relay will mark it dead."""
    event_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(
            table.event.insert().values(
                event_id=event_id,
                ordering_key=key,
                partition=ordering.partition_of(key, table.DEFAULT_PARTITIONS),
                routing_key="case.update",
                resource_type="case",
                payload=payload,
            )
        )
    return event_id


def versions_of(messages: list[Any]) -> list[int]:
    return [json.loads(m.body)["resource"]["content"]["version"] for m in messages]


def run_cli(args: list[str]) -> int:
    """``outbox ARGS`` in this process, leaving the logging setup as it found it."""
    import logging

    from outbox.cli.main import main

    logger, root = logging.getLogger("outbox"), logging.getLogger()
    saved = (logger.handlers[:], logger.level, logger.propagate, root.handlers[:], root.level)
    try:
        return main([*args, "--log-level", "WARNING", "--log-format", "json"])
    finally:
        logger.handlers[:], logger.level, logger.propagate, root.handlers[:], root.level = saved


def envelope_json(key_id: int, version: int, tenant: int = 1) -> str:
    return json.dumps(
        {
            "action": "update",
            "resource": {
                "schema": SCHEMA,
                "content": {"tenantId": tenant, "id": key_id, "version": version},
            },
        }
    )
