"""How a relay behaves: :class:`RelaySettings`, with the defaults ``outbox relay`` ships."""

from __future__ import annotations

from dataclasses import dataclass

from outbox.envelope import limits

UNROUTABLE_POLICIES = ("retry", "dead")
# Unconfirmed messages on the wire, by default (docs/performance.md has the measurements).
DEFAULT_WINDOW = 1000


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    batch_size: int = 500
    # Messages sent and not confirmed yet, at most (of different keys).
    window: int = DEFAULT_WINDOW
    poll_interval: float = 1.0
    lease_ttl: float = 15.0
    confirm_timeout: float = 10.0
    unroutable: str = "retry"
    source: str = "/outbox"
    # None: the reverse-DNS name of each event's schema URI host (outbox.relay.message).
    type_prefix: str | None = None
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    delete_on_delivery: bool = False
    max_payload_bytes: int = limits.DEFAULT_MAX_PAYLOAD_BYTES
    # Nacks or returns of one event before it is marked dead; 0: retry for ever.
    max_attempts: int = 0

    def __post_init__(self) -> None:
        if self.unroutable not in UNROUTABLE_POLICIES:
            raise ValueError(f"unroutable must be one of {UNROUTABLE_POLICIES}")
        if self.window < 1:
            raise ValueError("window must be at least 1")
