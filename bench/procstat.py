"""CPU time and memory of a process, read from /proc (Linux)."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """CPU use of a process and of this one over a stretch of wall time."""

    pid: int
    wall: float = 0.0
    server: float = 0.0
    own: float = 0.0

    def start(self) -> None:
        self.wall = time.monotonic()
        self.server = cpu_seconds(self.pid)
        self.own = own_cpu_seconds()

    def stop(self) -> tuple[float, float]:
        """(server CPU %, generator CPU %) of one core since start()."""
        wall = time.monotonic() - self.wall
        server = (cpu_seconds(self.pid) - self.server) / wall * 100
        own = (own_cpu_seconds() - self.own) / wall * 100
        return server, own
