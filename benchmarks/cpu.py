"""Where the CPU goes during a benchmark step, by process group (Linux /proc).

On a host that runs the broker, PostgreSQL and the relay together, the drain
is bound by CPU: what the relay and PostgreSQL use is taken from the broker.
The drain figure prints these per-event costs for the relay and for its
baseline, so the gap between them can be read, not guessed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GROUPS = ("broker", "postgres", "this process", "kernel")
_BROKER = ("beam.smp", "erl_child_setup", "inet_gethost", "epmd")
_KERNEL = ("kworker", "ksoftirqd", "jbd2", "kswapd")
_TICKS = os.sysconf("SC_CLK_TCK")


def _group(pid: int, name: str) -> str | None:
    if pid == os.getpid():
        return "this process"
    if name in _BROKER:
        return "broker"
    if name.startswith("postgres"):
        return "postgres"
    if name.startswith(_KERNEL):
        return "kernel"
    return None


def _read_stat(path: Path) -> tuple[str, float] | None:
    """(command name, CPU seconds used: user + system) from a /proc stat file; None if gone."""
    try:
        stat = path.read_text()
    except OSError:
        return None  # exited meanwhile
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / _TICKS


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (read := _read_stat(entry / "stat")) is not None:
            found[int(entry.name)] = read
    return found


class CpuUse:
    """CPU seconds per group used between entering and leaving :func:`measure_cpu`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def per_event_us(self, events: int) -> dict[str, float]:
        return {g: self.seconds.get(g, 0.0) / events * 1e6 for g in GROUPS}


@contextmanager
def measure_cpu() -> Iterator[CpuUse]:
    use = CpuUse()
    available = Path("/proc/self/stat").exists()
    before = _cpu_by_pid() if available else {}
    yield use
    if not available:
        return
    for pid, (name, seconds) in _cpu_by_pid().items():
        group = _group(pid, name)
        if group is not None:
            used = seconds - before.get(pid, (name, 0.0))[1]
            use.seconds[group] = use.seconds.get(group, 0.0) + used


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far; 0 if unreadable."""
    read = _read_stat(Path(f"/proc/{pid}/stat"))
    return 0.0 if read is None else read[1]
