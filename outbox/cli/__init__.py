"""The ``outbox`` command: settings, sub-commands, and the composition of a running relay."""
