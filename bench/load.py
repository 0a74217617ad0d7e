"""The load generator: real servers in subprocesses, real websocket clients, four workloads.

Every message body carries ``b|sender|seq|t_ns|`` so the receiving side can measure latency
(``t_ns`` is the generator's monotonic clock at send time) and check each sender's
sequence for loss and duplication, without decoding JSON on the hot path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.procstat import CpuWindow, rss_bytes

MARK = re.compile(r"b\|(\d+)\|(\d+)\|(\d+)\|")
#: The server's per-address limits (flags), all set to 0 (no limit) for the benchmark.
PER_ADDRESS_LIMITS = (
    "max-connections-per-ip",
    "address-rate",
    "catchup-rate",
    "rooms-per-hour",
    "nicks-per-hour",
    "http-rate",
)
SERVER_CPU = 0
GENERATOR_CPU = 1


def pin(pid: int, cpu: int) -> bool:
    """Put a process on one core, if the machine has it."""
    if cpu not in os.sched_getaffinity(0) and pid != 0:
        return False
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1_048_576
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


@dataclass
class Target:
    """A server under test: ``chat`` (compose-chat) or ``relay`` (the baseline)."""

    kind: str
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    db: Path | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, extra: Sequence[str] = ()) -> Target:
        self.port = free_port()
        if self.kind == "chat":
            self.tmp = tempfile.TemporaryDirectory(prefix="chat-bench-")
            self.db = Path(self.tmp.name) / "bench.db"
            # Limits raised out of the way and logging quiet: the message path is measured.
            cmd = [
                sys.executable,
                "-m",
                "chat_server",
                "--port",
                str(self.port),
                "--db",
                str(self.db),
                "--rate",
                "100000",
                "--burst",
                "100000",
                "--send-buffer-limit",
                str(16 * 1024 * 1024),
                # Every benchmark client comes from 127.0.0.1: no per-address limits.
                *(f"--{limit}=0" for limit in PER_ADDRESS_LIMITS),
                "--log-level",
                "WARNING",
                *extra,
            ]
        else:
            cmd = [sys.executable, "-m", "bench.relay", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pin(self.proc.pid, SERVER_CPU)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.tmp is not None:
            self.tmp.cleanup()

    def stored_rows(self) -> int:
        import sqlite3

        if self.db is None:
            return 0
        with sqlite3.connect(self.db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


@dataclass
class Run:
    """One fan-out run: what was sent and what every receiver saw."""

    senders: int
    sent: list[int] = field(default_factory=list)  # per sender
    latencies: list[int] = field(default_factory=list)  # ns
    last: dict[tuple[int, int], int] = field(default_factory=dict)  # (receiver, sender) -> seq
    received: int = 0
    duplicated: int = 0
    out_of_order: int = 0

    def see(self, receiver: int, data: str, now: int) -> None:
        match = MARK.search(data)
        if match is None:
            return
        sender, seq, stamp = int(match.group(1)), int(match.group(2)), int(match.group(3))
        self.latencies.append(now - stamp)
        self.received += 1
        key = (receiver, sender)
        last = self.last.get(key, -1)
        if seq <= last:
            self.duplicated += 1
        else:
            if seq != last + 1:
                self.out_of_order += 1
            self.last[key] = seq

    def unique(self) -> int:
        return sum(seq + 1 for seq in self.last.values())


@dataclass
class Result:
    workload: str
    target: str
    figures: dict[str, Any]


def percentile(values: list[int], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


async def open_clients(
    target: Target,
    count: int,
    rooms: Sequence[str],
    tag: str,
    secrets: dict[str, str] | None = None,
) -> list[ClientConnection]:
    """Connect ``count`` clients (with hello for chat), at most 200 handshakes at once.

    With ``secrets``, chat nicks are claimed with the secrets in it, and new ones are added.
    """
    gate = asyncio.Semaphore(int(os.environ.get("BENCH_CONNECT_CONCURRENCY", "200")))

    async def one(i: int) -> ClientConnection:
        async with gate:
            ws = await connect(
                target.url,
                compression=None,
                max_size=None,
                open_timeout=60,
                ping_interval=None,
                max_queue=None,
            )
            if target.kind == "chat":
                nick = f"{tag}{i}"
                room = rooms[i % len(rooms)]
                hello: dict[str, Any] = {"type": "hello", "nick": nick, "rooms": [room]}
                hello["history"] = 0
                if secrets is not None and nick in secrets:
                    hello["secret"] = secrets[nick]
                await ws.send(json.dumps(hello))
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "welcome" and secrets is not None and "secret" in frame:
                        secrets[nick] = frame["secret"]
                    if frame["type"] == "synced":
                        break
                    if frame["type"] == "error":
                        raise RuntimeError(frame)
            return ws

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def body(sender: int, seq: int, size: int) -> str:
    head = f"b|{sender}|{seq}|{time.monotonic_ns()}|"
    return head + "x" * max(0, size - len(head))


def frame_for(target: Target, room: str, sender: int, seq: int, size: int) -> str:
    text = body(sender, seq, size)
    if target.kind == "relay":
        return text
    return json.dumps({"type": "send", "cid": f"s{seq}", "room": room, "body": text})


async def fanout(
    target: Target, *, clients: int, rate: float, seconds: float, size: int = 200, tag: str = "f"
) -> Result:
    """``clients`` in one room, each sending ``rate`` messages/s of ``size`` bytes."""
    room = f"{tag}room"
    conns = await open_clients(target, clients, [room], tag)
    run = Run(clients, [0] * clients)
    await asyncio.sleep(0.5)  # let join presence settle

    async def receive(index: int, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                run.see(index, str(data), time.monotonic_ns())
        except ConnectionClosed:
            pass

    readers = [asyncio.create_task(receive(i, ws)) for i, ws in enumerate(conns)]
    window = CpuWindow(target.pid)
    window.start()
    total_rate = clients * rate
    started = time.monotonic()
    sent_total = 0
    tick = 0.005
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * total_rate) - sent_total
        for _ in range(due):
            sender = sent_total % clients
            seq = run.sent[sender]
            run.sent[sender] += 1
            sent_total += 1
            await conns[sender].send(frame_for(target, room, sender, seq, size))
        await asyncio.sleep(tick)
    send_wall = time.monotonic() - started
    expected = sent_total * clients
    deadline = time.monotonic() + 10
    while run.unique() < expected and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    server_cpu, own_cpu = window.stop()
    for ws in conns:
        await ws.close()
    await asyncio.gather(*readers)
    unique = run.unique()
    return Result(
        "fanout",
        target.kind,
        {
            "clients": clients,
            "rate_per_client": rate,
            "offered_deliveries_per_s": round(total_rate * clients),
            "deliveries_per_s": round(unique / send_wall),
            "sent": sent_total,
            "expected": expected,
            "lost": expected - unique,
            "duplicated": run.duplicated,
            "out_of_order": run.out_of_order,
            "p50_ms": round(percentile(run.latencies, 0.50), 2),
            "p99_ms": round(percentile(run.latencies, 0.99), 2),
            "max_ms": round(max(run.latencies, default=0) / 1e6, 2),
            "server_cpu_pct": round(server_cpu, 1),
            "generator_cpu_pct": round(own_cpu, 1),
            "server_rss_mib": round(rss_bytes(target.pid) / 2**20, 1),
        },
    )


async def saturation(
    target: Target, *, clients: int, seconds: float, rates: Sequence[float], limit_ms: float = 50.0
) -> Result:
    """Raise the rate until p99 passes ``limit_ms`` or anything is lost."""
    best: dict[str, Any] | None = None
    steps = []
    for n, rate in enumerate(rates):
        result = await fanout(target, clients=clients, rate=rate, seconds=seconds, tag=f"s{n}x")
        fig = result.figures
        ok = fig["lost"] == 0 and fig["duplicated"] == 0 and fig["p99_ms"] <= limit_ms
        steps.append(
            {
                k: fig[k]
                for k in (
                    "rate_per_client",
                    "deliveries_per_s",
                    "p99_ms",
                    "lost",
                    "server_cpu_pct",
                    "generator_cpu_pct",
                )
            }
        )
        if not ok:
            break
        best = fig
    return Result(
        "saturation",
        target.kind,
        {
            "sustained_deliveries_per_s": best["deliveries_per_s"] if best else 0,
            "at_rate_per_client": best["rate_per_client"] if best else 0,
            "p99_ms": best["p99_ms"] if best else None,
            "generator_cpu_pct": best["generator_cpu_pct"] if best else None,
            "steps": steps,
        },
    )


async def idle(target: Target, *, connections: int) -> Result:
    """Many idle connections: server memory per connection.

    Reported two ways: the RSS growth from a fresh server to ``connections`` open ones,
    divided by their number (which includes one-time growth: allocator arenas, SQLite's
    page cache filling with new nicks), and the marginal cost of the last 80% of them.
    """
    rooms = [f"idle{i}" for i in range(100)]
    first = connections // 5
    base = rss_bytes(target.pid)
    conns = await open_clients(target, first, rooms, "i")
    await asyncio.sleep(1)
    partial = rss_bytes(target.pid)
    conns += await open_clients(target, connections - first, rooms, "j")
    await asyncio.sleep(2)
    loaded = rss_bytes(target.pid)
    for ws in conns:
        await ws.close()
    return Result(
        "idle",
        target.kind,
        {
            "connections": connections,
            "rss_before_mib": round(base / 2**20, 1),
            "rss_after_mib": round(loaded / 2**20, 1),
            "kib_per_connection": round((loaded - base) / connections / 1024, 2),
            "marginal_kib_per_connection": round(
                (loaded - partial) / (connections - first) / 1024, 2
            ),
        },
    )


async def persistence(
    target: Target, *, senders: int, seconds: float, window: int = 64, size: int = 200
) -> Result:
    """Acknowledged, stored messages per second from many pipelining senders."""
    assert target.kind == "chat"
    conns = await open_clients(target, senders, [f"p{i}" for i in range(senders)], "p")
    acked = [0] * senders
    stop = asyncio.Event()
    cpu = CpuWindow(target.pid)

    async def sender(i: int, ws: ClientConnection) -> None:
        credit = asyncio.Semaphore(window)
        seq = 0

        async def read() -> None:
            async for data in ws:
                if str(data).startswith('{"type":"ack"'):
                    acked[i] += 1
                    credit.release()

        reader = asyncio.create_task(read())
        while not stop.is_set():
            await credit.acquire()
            await ws.send(frame_for(target, f"p{i}", i, seq, size))
            seq += 1
        await asyncio.sleep(1)
        reader.cancel()

    rows_before = target.stored_rows()
    cpu.start()
    started = time.monotonic()
    tasks = [asyncio.create_task(sender(i, ws)) for i, ws in enumerate(conns)]
    await asyncio.sleep(seconds)
    acked_in_window = sum(acked)
    wall = time.monotonic() - started
    stop.set()
    server_cpu, own_cpu = cpu.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ws in conns:
        await ws.close()
    stored = target.stored_rows() - rows_before
    return Result(
        "persistence",
        target.kind,
        {
            "senders": senders,
            "acked_per_s": round(acked_in_window / wall),
            "acked_total": sum(acked),
            "stored_rows": stored,
            "acked_but_not_stored": max(0, sum(acked) - stored),
            "server_cpu_pct": round(server_cpu, 1),
            "generator_cpu_pct": round(own_cpu, 1),
        },
    )
