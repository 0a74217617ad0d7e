"""Where a server's time goes, seen from outside: py-spy samples and per-thread CPU.

``py-spy record --idle --threads`` samples every thread of the running server (no code
change, no restart) on the wall clock; ``/proc/PID/task/*/stat`` gives each thread's CPU
time over the same window. Each sample is put in one category by the file and function
it was in (the innermost frame that names one), so the persistence engineer can see the
commit cycle's parts: SQLite itself in the database thread, the hops to and from that
thread, JSON, websockets framing and the server's own per-message Python work.

py-spy is an optional tool (``pip install 'compose-chat[bench]'``); without it the
profile says so and the rest of the benchmark runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import TICKS

#: (category, pattern in "function (file:line)") for the innermost frame that matches.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("JSON encode/decode", "json/"),
    ("websockets framing and I/O", "websockets/"),
    ("thread hop (aiosqlite queue, futures)", "aiosqlite/"),
    ("thread hop (aiosqlite queue, futures)", "asyncio/futures.py"),
    ("thread hop (aiosqlite queue, futures)", "threading.py"),
    ("thread hop (aiosqlite queue, futures)", "queue.py"),
    ("store: per-message Python (rows, records)", "chat_server/backends/sqlite.py"),
    ("store: per-message Python (rows, records)", "chat_server/messages.py"),
    ("store: per-message Python (rows, records)", "(<string>:"),  # dataclass __init__
    ("fan-out (encode once, write per recipient)", "chat_server/fanout.py"),
    ("server: commit listener (acks, recipients)", "chat_server/app.py"),
    ("session: parse and check requests", "chat_server/session.py"),
    ("session: parse and check requests", "chat_protocol/"),
    ("store: writer queue (asyncio.Queue)", "asyncio/queues.py"),
    ("asyncio machinery", "asyncio/"),
    ("logging", "logging/"),
)
#: The event loop's own C code: waiting in epoll, or socket I/O done in C.
LOOP = "event loop in C (socket I/O, or waiting)"


def available() -> str | None:
    """The py-spy executable, if installed next to this Python or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process."""
    times: dict[int, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        times[int(task)] = (int(fields[11]) + int(fields[12])) / TICKS
    return times


def categorize(frames: list[str]) -> str:
    """The category of one sample, from its frames (outermost first)."""
    for frame in reversed(frames):
        if frame.startswith(("Runner.run ", "run (uvloop")):
            return LOOP  # nothing in Python above the loop: its C code is running
        for name, pattern in CATEGORIES:
            if pattern in frame:
                return name
    return "other"


@dataclass
class Profile:
    """A py-spy recording of a server for ``seconds``, started with start()."""

    pid: int
    seconds: float
    rate: int = 100
    proc: subprocess.Popen[bytes] | None = None
    out: Path | None = None
    cpu_before: dict[int, float] = field(default_factory=dict)
    started: float = 0.0
    error: str | None = None

    def start(self) -> None:
        spy = available()
        if spy is None:
            self.error = "py-spy is not installed (pip install 'compose-chat[bench]')"
            return
        self.out = Path(tempfile.mkdtemp(prefix="chat-profile-")) / "samples.txt"
        self.cpu_before = thread_cpu(self.pid)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.pid),
                "--duration",
                str(max(1, round(self.seconds))),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--threads",
                "--idle",
                "--nonblocking",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self) -> dict[str, Any]:
        if self.proc is None or self.out is None:
            return {"error": self.error}
        _, err = self.proc.communicate(timeout=self.seconds + 60)
        wall = time.monotonic() - self.started
        cpu_after = thread_cpu(self.pid)
        if not self.out.exists():
            return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
        threads: dict[int, Counter[str]] = {}
        names: dict[int, str] = {}
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack.startswith("thread ("):
                continue
            head, *frames = stack.split(";")
            tid = int(head[len("thread (") : head.index(")")])
            names[tid] = head.split(": ", 1)[-1] if ": " in head else str(tid)
            kind = categorize(frames)
            if "_connection_worker_thread" in stack:  # an aiosqlite database thread
                last = frames[-1] if frames else ""
                kind = (
                    "SQLite: execute and commit (incl. fsync)"
                    if "core.py:59" not in last
                    else "waiting for work"
                )
            threads.setdefault(tid, Counter())[kind] += int(count)
        shutil.rmtree(self.out.parent, ignore_errors=True)
        report = []
        for tid, counts in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(counts.values())
            cpu = cpu_after.get(tid, 0.0) - self.cpu_before.get(tid, 0.0)
            report.append(
                {
                    "thread": names.get(tid, str(tid)),
                    "cpu_pct": round(cpu / wall * 100, 1),
                    "samples": total,
                    "share_pct": {
                        kind: round(n / total * 100, 1) for kind, n in counts.most_common()
                    },
                }
            )
        return {"wall_s": round(wall, 2), "rate_hz": self.rate, "threads": report}
