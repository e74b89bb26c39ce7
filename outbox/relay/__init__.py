"""The relay: its loop, the publishers it sends through, and message building."""

from outbox.relay.loop import Relay, RelaySettings
from outbox.relay.publisher import Publisher, open_publisher

__all__ = ["Publisher", "Relay", "RelaySettings", "open_publisher"]
