"""CPU time and memory of processes and cores, read from /proc (Linux)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def own_cpu_seconds() -> float:
    """User + system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def core_times() -> dict[int, tuple[int, int, int]]:
    """Per core: (busy, total, steal) jiffies. Busy counts softirq too: on loopback, the
    receiving side's TCP work runs there. Steal is time this virtual machine's CPU was
    ready to run but the host ran something else: it counts as busy here, and it is the
    one load that ``uptime`` inside the machine cannot show."""
    times = {}
    with open("/proc/stat") as file:
        for line in file:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                numbers = [int(v) for v in values[:8]]
                idle = numbers[3] + numbers[4]  # idle + iowait
                times[int(name[3:])] = (sum(numbers) - idle, sum(numbers), numbers[7])
    return times


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


@dataclass
class Window:
    """CPU use of the server, of the generator's processes and of each core over a
    stretch of wall time, as percentages of one core."""

    server: int
    generator: Sequence[int]
    server_core: int | None = 0
    wall: float = 0.0
    server_cpu: float = 0.0
    generator_cpu: float = 0.0
    cores: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def start(self) -> None:
        self.wall = time.monotonic()
        self.server_cpu = cpu_seconds(self.server)
        self.generator_cpu = sum(cpu_seconds(pid) for pid in self.generator)
        self.cores = core_times()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        server = cpu_seconds(self.server) - self.server_cpu
        generator = sum(cpu_seconds(pid) for pid in self.generator) - self.generator_cpu
        figures = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server, 3),
            "server_cpu_pct": round(server / wall * 100, 1),
            "generator_cpu_pct": round(generator / wall * 100, 1),
        }
        now = core_times()
        stolen = elapsed = 0
        for core, (busy, total, steal) in now.items():
            busy0, total0, steal0 = self.cores.get(core, (0, 0, 0))
            if total > total0:
                figures[f"core{core}_busy_pct"] = round((busy - busy0) / (total - total0) * 100, 1)
                stolen += steal - steal0
                elapsed += total - total0
        if elapsed:
            # Figures from two sessions differ when the host is busier in one of them.
            figures["host_steal_pct"] = round(stolen / elapsed * 100, 1)
        if self.server_core is not None and f"core{self.server_core}_busy_pct" in figures:
            # What else ran on the server's core (other processes, the kernel's own work):
            # a figure taken on a busy machine says so here.
            others = figures[f"core{self.server_core}_busy_pct"] - figures["server_cpu_pct"]
            figures["others_on_server_core_pct"] = round(max(0.0, others), 1)
        return figures


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters (whole machine) that tell of a full listen queue:
    connections dropped there are retried by the client after 1, 3, 7... seconds."""
    wanted = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")
    with open("/proc/net/netstat") as file:
        lines = file.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return {name: int(table.get(name, 0)) for name in wanted}
    return dict.fromkeys(wanted, 0)
