"""The schema registry commands (outbox schemas ...)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

CommandFactory = Callable[[str, str, Callable[..., int]], argparse.ArgumentParser]


def add_commands(command: CommandFactory) -> None:
    """Register this module's sub-commands with ``command(name, help, run)``."""
    del command
