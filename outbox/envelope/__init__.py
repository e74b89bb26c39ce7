"""The envelope: value objects, the lossless codec, the ordering key, validation. No I/O."""

from outbox.envelope.model import Action, Envelope, ResourceReference

__all__ = ["Action", "Envelope", "ResourceReference"]
