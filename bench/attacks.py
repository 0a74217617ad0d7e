"""``python -m bench.attacks KIND``: the attacks of issue 10, against a real server process,
with the figures that show whether the server holds.

Each attack starts its own server (``python -m chat_server`` from whatever ``chat_server``
this Python imports, with its default settings unless ``--server-arg`` says otherwise),
on a fresh database in a temporary directory, and prints what it measured:

* ``catchup``: 32 rooms of 200 maximum-size messages; from N addresses (127.0.0.2, …),
  connect, send ``hello`` for all 32 rooms with ``history: 200``, hang up, repeat. Server
  RSS and CPU, ``/healthz`` and a witness's ack latency, before, during and after.
* ``shutdown``: SIGTERM with an idle TCP connection, a half-sent handshake and a client
  that never answers the closing handshake open: seconds to exit, and the exit status.
* ``backup``: the live backup of a database of 500,000 messages while a client writes.
* ``ratelimit``: one nick reconnecting and bursting: acknowledged messages per second.
* ``quotas``: one address creating rooms and registering nicks as fast as it can.
* ``presence``: N clients (over several source addresses) join one room at once: time
  until all are in, presence frames, a witness's ack latency meanwhile.
* ``healthz``: a flood of ``/healthz`` from one address: answers and probe writes.

The same command measures any version of the server: run it with ``PYTHONPATH`` pointing
at another checkout's ``chat_server`` to get the "before" figures, from a working directory
that holds no ``chat_server`` (``python -m`` puts the current directory first on the path,
ahead of ``PYTHONPATH``, for this tool and for the server it starts). Settings a version
does not have are left out (the server's ``--help`` says which it has).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.procstat import cpu_seconds, own_cpu_seconds, rss_bytes

MIB = 1024 * 1024
#: The server runs on the first CPU, the attackers on the second (when there are two).
SERVER_CPU, GENERATOR_CPU = 0, 1


def _pin(cpu: int, pid: int = 0) -> None:
    with contextlib.suppress(OSError):
        if cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(pid, {cpu})


# --- the server under attack ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Server:
    """``python -m chat_server`` on a database in ``workdir``, on a free port."""

    workdir: Path
    args: Sequence[str] = ()
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    flags: set[str] = field(default_factory=set)

    @property
    def db(self) -> Path:
        return self.workdir / "attack.db"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def known(self, *args: str) -> list[str]:
        """Those ``--flag value`` pairs this server version has."""
        if not self.flags:
            done = subprocess.run(
                [sys.executable, "-m", "chat_server", "--help"], capture_output=True, text=True
            )
            self.flags = {word for word in done.stdout.split() if word.startswith("--")}
        pairs = zip(args[::2], args[1::2], strict=True)
        return [part for flag, value in pairs if flag in self.flags for part in (flag, value)]

    def start(self) -> Server:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "chat_server", "--port", str(self.port), "--db", str(self.db)]
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=log)
        _pin(SERVER_CPU, self.proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited: {(self.workdir / 'server.log').read_text()}"
                )
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 60 s; the exit status (negative: killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


#: Where to copy the server's log when the attack ends (--server-log).
SERVER_LOG: Path | None = None


@contextlib.contextmanager
def running(args: Sequence[str]) -> Any:
    with tempfile.TemporaryDirectory(prefix="chat-attack-") as tmp:
        server = Server(Path(tmp), args)
        try:
            yield server
        finally:
            server.stop()
            log = server.workdir / "server.log"
            if SERVER_LOG is not None and log.exists():
                SERVER_LOG.write_bytes(log.read_bytes())


async def fill_store(db: Path, rooms: Sequence[str], per_room: int, body: str) -> None:
    """Write messages through the server's own store (no SQL here), then close it."""
    from chat_server.backends.sqlite import Store
    from chat_server.messages import Draft

    class Quiet:
        def committed(self, results: Any) -> None:
            pass

        def failed(self, drafts: Any, error: Exception) -> None:
            raise SystemExit(f"filling the database failed: {error}")

    store = await Store.open(db, synchronous="OFF")
    store.start(Quiet())
    for room in rooms:
        for n in range(per_room):
            await store.submit(
                Draft("filler", "filler", room, None, None, False, body, f"{room}-{n}")
            )
    await store.close()


# --- clients ----------------------------------------------------------------------------------


def health(port: int, timeout: float = 2.0) -> tuple[int, float]:
    """(/healthz status, 0 on no answer; seconds it took)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            status = int(r.status)
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.monotonic() - started


async def hello(
    url: str, nick: str | None = None, *, source: str = "127.0.0.1", **fields: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect from ``source``, say hello; the connection and the server's first answer."""
    ws = await connect(url, local_addr=(source, 0), max_size=None, open_timeout=30)
    if nick is not None:
        fields["nick"] = nick
    await ws.send(json.dumps({"type": "hello", **fields}))
    first = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return ws, first


async def until(ws: ClientConnection, kind: str, within: float = 60) -> list[dict[str, Any]]:
    """Every frame up to and including the next one of this type."""
    frames = []
    async with asyncio.timeout(within):
        while True:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if frame["type"] == kind:
                return frames


class Witness:
    """A client that says something every ``every`` seconds and times each ack."""

    def __init__(self, url: str, every: float = 0.5) -> None:
        self.url = url
        self.every = every
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        nick = "witness-" + uuid.uuid4().hex[:6]
        while not self._stop.is_set():
            try:
                ws, _ = await hello(self.url, nick, history=0)
            except (OSError, TimeoutError, InvalidStatus, ConnectionClosed):
                self.failures += 1
                await asyncio.sleep(self.every)
                continue
            try:
                await until(ws, "synced")
                while not self._stop.is_set():
                    cid = uuid.uuid4().hex
                    started = time.monotonic()
                    frame = {"type": "send", "cid": cid, "room": "lobby", "body": "ping"}
                    await ws.send(json.dumps(frame))
                    async with asyncio.timeout(30):
                        while True:
                            answer = json.loads(await ws.recv())
                            if answer.get("cid") == cid and answer["type"] in ("ack", "error"):
                                break
                    if answer["type"] == "ack":
                        self.latencies.append(time.monotonic() - started)
                    else:
                        self.failures += 1
                    await asyncio.sleep(self.every)
            except (OSError, TimeoutError, ConnectionClosed):
                self.failures += 1
            finally:
                ws.transport.abort()

    def stop(self) -> None:
        self._stop.set()

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "witness_acks": len(ordered),
            "witness_failures": self.failures,
            "witness_ack_p50_ms": round(ordered[len(ordered) // 2] * 1000, 1) if ordered else None,
            "witness_ack_max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
        }


@dataclass
class Sampler:
    """The server's RSS and CPU, and /healthz, every ``every`` seconds."""

    server: Server
    every: float = 0.5
    samples: list[dict[str, float]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        start = time.monotonic()
        while not stop.is_set():
            status, took = await asyncio.to_thread(health, self.server.port)
            self.samples.append(
                {
                    "t": round(time.monotonic() - start, 2),
                    "rss_mib": round(rss_bytes(self.server.pid) / MIB, 1),
                    "cpu_s": round(cpu_seconds(self.server.pid), 2),
                    "healthz": status,
                    "healthz_s": round(took, 3),
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)


@contextlib.asynccontextmanager
async def sampling(server: Server, every: float = 0.5) -> AsyncIterator[Sampler]:
    sampler = Sampler(server, every)
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.run(stop))
    try:
        yield sampler
    finally:
        stop.set()
        await task


def sources(count: int) -> list[str]:
    """Source addresses 127.0.0.2 … (loopback: any 127.x.y.z is this machine)."""
    return [f"127.0.{(n + 2) // 250}.{(n + 2) % 250 or 250}" for n in range(count)]


# --- the attacks ------------------------------------------------------------------------------


async def _catchup_attackers(
    url: str, rooms: list[str], addresses: int, per_address: int, seconds: float, patience: float
) -> dict[str, int]:
    """Each attacker registers its nick once, then: connect, hello with the secret (a
    takeover), wait at most ``patience`` seconds for an answer, hang up, again."""
    hellos = answered = refused = failed = 0
    stop_at = time.monotonic() + seconds

    async def attacker(source: str, n: int) -> None:
        nonlocal hellos, answered, refused, failed
        nick = f"atk{n}-{source.replace('.', '-')}"
        try:
            ws, first = await hello(url, nick, source=source, history=0)
        except (OSError, TimeoutError, InvalidStatus, ConnectionClosed):
            failed += 1
            return
        secret = first.get("secret")
        ws.transport.abort()
        while time.monotonic() < stop_at:
            try:
                ws = await connect(url, local_addr=(source, 0), max_size=None, open_timeout=5)
            except (OSError, TimeoutError, InvalidStatus):
                failed += 1
                await asyncio.sleep(0.05)
                continue
            frame = {
                "type": "hello",
                "nick": nick,
                "secret": secret,
                "rooms": rooms,
                "history": 200,
            }
            try:
                await ws.send(json.dumps(frame))
                hellos += 1
                first = json.loads(await asyncio.wait_for(ws.recv(), patience))
                answered += 1
                refused += first["type"] == "error"
            except (TimeoutError, ConnectionClosed):
                pass
            ws.transport.abort()  # gone, without a word

    await asyncio.gather(
        *(attacker(source, n) for source in sources(addresses) for n in range(per_address))
    )
    return {
        "hellos_sent": hellos,
        "hellos_answered_in_time": answered,
        "hellos_refused": refused,
        "connections_failed": failed,
    }


def _in_process(function: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run an attack's clients in this (the generator's own) process; add its CPU time,
    to tell when a figure is the generator's limit rather than the server's."""
    _pin(GENERATOR_CPU)
    started, cpu = time.monotonic(), own_cpu_seconds()
    result: dict[str, Any] = asyncio.run(function(*args))
    result["generator_cpu_pct"] = round(
        (own_cpu_seconds() - cpu) / (time.monotonic() - started) * 100
    )
    return result


async def catchup(args: argparse.Namespace) -> dict[str, Any]:
    rooms = [f"big{n}" for n in range(32)]
    with running(args.server_arg) as server:
        started = time.monotonic()
        await fill_store(server.db, rooms, 200, args.body_char * 4000)
        filled = time.monotonic() - started
        server.start()
        await asyncio.sleep(1.0)
        baseline = rss_bytes(server.pid)
        witness = Witness(server.url)
        witness_task = asyncio.create_task(witness.run())
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(1) as pool:
            async with sampling(server) as sampler:
                await asyncio.sleep(2.0)
                cpu_before = cpu_seconds(server.pid)
                began = sampler.samples[-1]["t"]
                counts = await loop.run_in_executor(
                    pool,
                    _in_process,
                    _catchup_attackers,
                    server.url,
                    rooms,
                    args.addresses,
                    args.per_address,
                    args.seconds,
                    args.patience,
                )
                ended = sampler.samples[-1]["t"]
                cpu_attack = cpu_seconds(server.pid) - cpu_before
                await asyncio.sleep(args.after)
        witness.stop()
        await witness_task
        stopping = time.monotonic()
        status = await asyncio.to_thread(server.stop)
        stop_seconds = time.monotonic() - stopping
        samples = sampler.samples
        down_after = [s["t"] for s in samples if s["t"] > ended and s["healthz"] != 200]
        return {
            "attack": "catchup",
            "addresses": args.addresses,
            "connections_per_address": args.per_address,
            "seconds": args.seconds,
            "fill_seconds": round(filled, 1),
            **counts,
            "rss_baseline_mib": round(baseline / MIB, 1),
            "rss_peak_mib": max(s["rss_mib"] for s in samples),
            "rss_end_mib": samples[-1]["rss_mib"],
            "server_cpu_s_during_attack": round(cpu_attack, 2),
            "server_cpu_s_after_attack": round(samples[-1]["cpu_s"] - cpu_before - cpu_attack, 2),
            "healthz_failures_during": sum(
                1 for s in samples if began <= s["t"] <= ended and s["healthz"] != 200
            ),
            "healthz_down_after_attack_s": round(max(down_after) - ended, 1) if down_after else 0,
            "healthz_max_s": max(s["healthz_s"] for s in samples),
            **witness.figures(),
            "sigterm_exit_status": status,
            "sigterm_seconds": round(stop_seconds, 1),
            "timeline": samples,
        }


async def shutdown(args: argparse.Namespace) -> dict[str, Any]:
    with running(args.server_arg) as server:
        server.start()
        loop = asyncio.get_running_loop()
        idle = socket.socket()
        idle.setblocking(False)
        await loop.sock_connect(idle, ("127.0.0.1", server.port))
        half = socket.socket()
        half.setblocking(False)
        await loop.sock_connect(half, ("127.0.0.1", server.port))
        await loop.sock_sendall(half, b"GET / HTTP/1.1\r\nHost: x\r\n")
        frozen, _ = await hello(server.url, "frozen")
        await until(frozen, "synced")
        frozen.transport.pause_reading()
        await asyncio.sleep(0.5)
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 60)
        elapsed = time.monotonic() - started
        frozen.transport.abort()
        idle.close()
        half.close()
        return {"attack": "shutdown", "exit_status": code, "seconds_to_exit": round(elapsed, 2)}


async def backup(args: argparse.Namespace) -> dict[str, Any]:
    with running(args.server_arg) as server:
        started = time.monotonic()
        await fill_store(server.db, ["lobby"], args.messages, "the quick brown fox " * 8)
        filled = time.monotonic() - started
        server.start()
        writes = 0
        stop = asyncio.Event()

        async def writer() -> None:
            nonlocal writes
            ws, _ = await hello(server.url, "writer", history=0)
            await until(ws, "synced")
            while not stop.is_set():
                cid = uuid.uuid4().hex
                frame = {"type": "send", "cid": cid, "room": "lobby", "body": "during backup"}
                await ws.send(json.dumps(frame))
                while json.loads(await ws.recv()).get("cid") != cid:
                    pass
                writes += 1
                await asyncio.sleep(1 / args.write_rate)
            await ws.close()

        task = asyncio.create_task(writer())
        await asyncio.sleep(1.0)
        before = writes
        dest = server.workdir / "backup.db"
        began = time.monotonic()
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "chat_server.backup", "--db", str(server.db), str(dest)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            result, status = done.stdout.strip() or done.stderr.strip(), done.returncode
        except subprocess.TimeoutExpired:
            result, status = f"not finished after {args.timeout} s", None
        elapsed = time.monotonic() - began
        stop.set()
        await task
        return {
            "attack": "backup",
            "messages": args.messages,
            "database_mib": round(server.db.stat().st_size / MIB, 1),
            "fill_seconds": round(filled, 1),
            "writes_during_backup": writes - before,
            "backup_seconds": round(elapsed, 1),
            "backup_exit_status": status,
            "backup_result": result,
        }


async def ratelimit(args: argparse.Namespace) -> dict[str, Any]:
    """One nick, reconnecting as fast as it can, each time sending a burst of 40."""
    with running(args.server_arg) as server:
        server.start()
        ws, first = await hello(server.url, "fast", history=0)
        secret = first.get("secret")
        ws.transport.abort()
        stop_at = time.monotonic() + args.seconds
        connections = 0

        async def burst() -> None:
            nonlocal connections
            while time.monotonic() < stop_at:
                try:
                    ws, _ = await hello(server.url, "fast", secret=secret, history=0)
                    await until(ws, "synced", within=10)
                    for n in range(40):
                        body = {
                            "type": "send",
                            "cid": uuid.uuid4().hex,
                            "room": "lobby",
                            "body": str(n),
                        }
                        await ws.send(json.dumps(body))
                    await asyncio.sleep(0.02)  # let the frames arrive, then go
                    ws.transport.abort()
                    connections += 1
                except (OSError, TimeoutError, InvalidStatus, ConnectionClosed):
                    await asyncio.sleep(0.01)

        started = time.monotonic()
        await asyncio.gather(*(burst() for _ in range(4)))
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)
        stored = _count(server.db, "SELECT COUNT(*) FROM messages WHERE sender_key = 'fast'")
        return {
            "attack": "ratelimit",
            "seconds": round(elapsed, 1),
            "connections": connections,
            "messages_stored": stored,
            "stored_per_s": round(stored / elapsed, 1),
        }


async def quotas(args: argparse.Namespace) -> dict[str, Any]:
    """From one address: hellos naming 32 new rooms each, then hellos with new nicks."""
    source = sources(1)[0]
    with running(args.server_arg) as server:
        server.start()
        ws, first = await hello(server.url, "builder", source=source, history=0)
        secret = first.get("secret")
        ws.transport.abort()
        counter = 0

        async def flood(make: Callable[[int], dict[str, Any]]) -> None:
            nonlocal counter
            stop_at = time.monotonic() + args.seconds
            while time.monotonic() < stop_at:
                counter += 1
                fields = make(counter)
                try:
                    ws, _ = await hello(server.url, source=source, **fields)
                    ws.transport.abort()
                except (OSError, TimeoutError, InvalidStatus, ConnectionClosed):
                    await asyncio.sleep(0.01)

        def new_rooms(n: int) -> dict[str, Any]:
            rooms = [f"r{n}x{k}" for k in range(32)]
            return {"nick": "builder", "secret": secret, "rooms": rooms, "history": 0}

        def new_nick(n: int) -> dict[str, Any]:
            return {"nick": f"n{n}-{uuid.uuid4().hex[:8]}", "history": 0}

        started = time.monotonic()
        await asyncio.gather(*(flood(new_rooms) for _ in range(8)))
        rooms_elapsed = time.monotonic() - started
        rooms = _count(server.db, "SELECT COUNT(*) FROM rooms")
        ws, _ = await hello(server.url, "builder", secret=secret, history=0)
        await until(ws, "synced")
        asked = time.monotonic()
        await ws.send(json.dumps({"type": "rooms"}))
        reply = (await until(ws, "rooms"))[-1]
        rooms_reply_ms = (time.monotonic() - asked) * 1000
        ws.transport.abort()
        before = _count(server.db, "SELECT COUNT(*) FROM nicks")
        started = time.monotonic()
        await asyncio.gather(*(flood(new_nick) for _ in range(8)))
        nicks_elapsed = time.monotonic() - started
        nicks = _count(server.db, "SELECT COUNT(*) FROM nicks") - before
        return {
            "attack": "quotas",
            "rooms_created": rooms,
            "rooms_per_s": round(rooms / rooms_elapsed, 1),
            "rooms_reply_bytes": len(json.dumps(reply)),
            "rooms_reply_ms": round(rooms_reply_ms, 1),
            "nicks_registered": nicks,
            "nicks_per_s": round(nicks / nicks_elapsed, 1),
        }


def _count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


async def _presence_members(url: str, clients: int, addresses: list[str]) -> dict[str, Any]:
    """Runs in the generator's own process: every client joins lobby at once."""
    _raise_nofile()
    semaphore = asyncio.Semaphore(200)  # handshakes at once
    counts: list[int] = []
    started = time.monotonic()

    failed: list[str] = []

    async def member(n: int) -> ClientConnection | None:
        try:
            async with semaphore:
                source = addresses[n % len(addresses)]
                ws = await connect(url, local_addr=(source, 0), max_size=None, open_timeout=60)
                await ws.send(json.dumps({"type": "hello", "nick": f"m{n}", "history": 0}))
            # Scanned, not decoded: the generator must stay cheaper than the server.
            while '"type":"synced"' not in str(await ws.recv()):
                pass
        except (OSError, TimeoutError, InvalidStatus, ConnectionClosed) as exc:
            failed.append(
                type(exc).__name__
                + (f" {exc.rcvd.code}" if isinstance(exc, ConnectionClosed) and exc.rcvd else "")
            )
            return None
        return ws

    joined = await asyncio.gather(*(member(n) for n in range(clients)))
    all_in = time.monotonic() - started
    sockets = [ws for ws in joined if ws is not None]

    async def drain(ws: ClientConnection) -> None:
        count = 0
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(2.0):
                while True:
                    count += str(await ws.recv()).startswith('{"type":"presence"')
        counts.append(count)

    await asyncio.gather(*(drain(ws) for ws in sockets))
    for ws in sockets:
        ws.transport.abort()
    return {
        "seconds_until_all_synced": round(all_in, 2),
        "clients_failed": len(failed),
        "failures": sorted(set(failed)),
        "presence_frames_after": sum(counts),
    }


async def presence(args: argparse.Namespace) -> dict[str, Any]:
    with running(args.server_arg) as server:
        server.start()
        witness = Witness(server.url, every=0.1)
        witness_task = asyncio.create_task(witness.run())
        await asyncio.sleep(1.0)
        addresses = sources(max(1, -(-args.clients // 60)))  # under 64 connections each
        cpu_before = cpu_seconds(server.pid)
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(1) as pool:
            figures = await loop.run_in_executor(
                pool, _in_process, _presence_members, server.url, args.clients, addresses
            )
        cpu = cpu_seconds(server.pid) - cpu_before
        witness.stop()
        await witness_task
        return {
            "attack": "presence",
            "clients": args.clients,
            "source_addresses": len(addresses),
            **figures,
            "server_cpu_s": round(cpu, 2),
            **witness.figures(),
        }


async def healthz(args: argparse.Namespace) -> dict[str, Any]:
    with running(args.server_arg) as server:
        server.start()
        before = _probe_value(server.db)
        statuses: dict[int, int] = {}
        started = time.monotonic()
        probe_changes = 0
        last = before

        async def one() -> None:
            status, _ = await asyncio.to_thread(health, server.port, 5.0)
            statuses[status] = statuses.get(status, 0) + 1

        while time.monotonic() - started < args.seconds:
            await asyncio.gather(*(one() for _ in range(20)))
            value = _probe_value(server.db)
            probe_changes += value != last
            last = value
        elapsed = time.monotonic() - started
        return {
            "attack": "healthz",
            "requests": sum(statuses.values()),
            "requests_per_s": round(sum(statuses.values()) / elapsed, 1),
            "statuses": statuses,
            "probe_writes_seen": probe_changes,
        }


def _probe_value(db: Path) -> str:
    """The value the /healthz probe writes (a timestamp): it changes with every probe."""
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'probe'").fetchone()[0])


ATTACKS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "catchup": catchup,
    "shutdown": shutdown,
    "backup": backup,
    "ratelimit": ratelimit,
    "quotas": quotas,
    "presence": presence,
    "healthz": healthz,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attacks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="a flag for the server (repeat; e.g. --server-arg=--rate --server-arg=100)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the attack lasts")
    parser.add_argument("--after", type=float, default=30.0, help="seconds watched afterwards")
    parser.add_argument("--addresses", type=int, default=4, help="source addresses (catchup)")
    parser.add_argument(
        "--per-address", type=int, default=8, help="attacking connections per address (catchup)"
    )
    parser.add_argument("--body-char", default="x", help="the character of the 4000 (catchup)")
    parser.add_argument(
        "--patience", type=float, default=0.2, help="seconds an attacker waits for an answer"
    )
    parser.add_argument("--messages", type=int, default=500_000, help="messages (backup)")
    parser.add_argument("--write-rate", type=float, default=20.0, help="msg/s (backup)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (backup)")
    parser.add_argument("--clients", type=int, default=2000, help="clients (presence)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--server-log", type=Path, help="keep the server's log in this file")
    args = parser.parse_args(argv)
    global SERVER_LOG
    SERVER_LOG = args.server_log
    figures = asyncio.run(ATTACKS[args.attack](args))
    shown = {k: v for k, v in figures.items() if k != "timeline"}
    print(json.dumps(shown, indent=1))
    if "timeline" in figures:
        print("t(s)  rss(MiB)  cpu(s)  healthz  (s)")
        for sample in figures["timeline"]:
            print(
                f"{sample['t']:5.1f} {sample['rss_mib']:8.1f} {sample['cpu_s']:7.2f}"
                f"  {sample['healthz']:7d} {sample['healthz_s']:5.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    os._exit(0)  # do not wait for attack connections the server may still be closing


if __name__ == "__main__":
    main()
