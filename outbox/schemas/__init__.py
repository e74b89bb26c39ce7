"""Resource schemas: the registry, Avro, and compatibility between versions."""

from outbox.schemas.registry import SchemaRegistry, relay_hooks

__all__ = ["SchemaRegistry", "relay_hooks"]
