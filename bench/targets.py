"""Servers under test, each in its own process on its own core: compose-chat or the relay.

compose-chat is started the way it is deployed (``python -m chat_server``) with the limits
that would get in a benchmark's way raised, on a temporary database. The relay
(``bench/relay.py``) is the baseline.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVER_CPU = 0


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def generator_cpus() -> list[int]:
    """Every core but the server's; the server's alone on a one-core machine."""
    others = [cpu for cpu in cpus() if cpu != SERVER_CPU]
    return others or cpus()


def pin(pid: int, cpu_set: Sequence[int]) -> bool:
    """Put a process on some cores, if the machine has them."""
    try:
        os.sched_setaffinity(pid, set(cpu_set))
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise this process's open-files limit to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1_048_576
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


#: The server's per-address limits (flags), all 0 (no limit): every benchmark client
#: comes from 127.0.0.x.
PER_ADDRESS_LIMITS = (
    "max-connections-per-ip",
    "address-rate",
    "catchup-rate",
    "rooms-per-hour",
    "nicks-per-hour",
    "http-rate",
)
#: Server settings for the benchmark: limits raised out of the way, logging quiet.
CHAT_ARGS = (
    "--rate",
    "100000",
    "--burst",
    "100000",
    "--send-buffer-limit",
    str(16 * 1024 * 1024),
    *(f"--{limit}=0" for limit in PER_ADDRESS_LIMITS),
)


@dataclass
class Target:
    """A server under test: ``chat`` (compose-chat) or ``relay`` (the baseline).

    ``module`` replaces ``chat_server`` for a chat server run in another way (the memory
    profile runs it under ``bench.memserver``). ``log`` keeps the server's log.
    """

    kind: str
    extra: Sequence[str] = ()
    module: str = "chat_server"
    log_level: str = "WARNING"
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    tmp: tempfile.TemporaryDirectory[str] | None = None
    db: Path | None = None
    log: Path | None = None
    stdin: bool = False
    logs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        if self.kind == "relay":
            return [sys.executable, "-m", "bench.relay", str(self.port)]
        assert self.db is not None
        return [
            sys.executable,
            "-m",
            self.module,
            "--port",
            str(self.port),
            "--db",
            str(self.db),
            *CHAT_ARGS,
            "--log-level",
            self.log_level,
            *self.extra,
        ]

    def start(self) -> Target:
        """Start on a new port and a new database (or, after stop(), the same ones)."""
        if not self.port:
            self.port = free_port()
        if self.tmp is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="chat-bench-")
            self.db = Path(self.tmp.name) / "bench.db"
            self.log = Path(self.tmp.name) / "server.log"
        assert self.log is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                stderr=log,
            )
        pin(self.proc.pid, [SERVER_CPU])
        self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited: {self.log_tail()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.01)
        raise RuntimeError(f"{self.kind} server did not start: {self.log_tail()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as a deployment restarts it; keeps port and database.

        The server's log so far is kept in ``logs``, one entry per start."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None and self.log.exists():
            self.logs.append(self.log.read_text(errors="replace"))
            self.log.write_bytes(b"")

    def cleanup(self) -> None:
        self.stop()
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-2000:]

    def stored_rows(self) -> int:
        import sqlite3

        if self.db is None:
            return 0
        with sqlite3.connect(self.db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
