"""The server as a real process: SIGTERM shutdown and kill -9 durability."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from tests.helpers import NO_LIMIT_FLAGS, NO_LIMITS, peer, server
from tests.procs import ServerProcess


@pytest.fixture
def proc(db: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(db, *NO_LIMIT_FLAGS).start()
    yield server
    server.stop()


async def test_sigterm_closes_clients_with_1001_and_exits_0(proc: ServerProcess, db: Path) -> None:
    async with peer(proc.url, "alice") as alice, peer(proc.url, "bob") as bob:
        await alice.say("before shutdown")
        started = time.monotonic()
        code = await asyncio.to_thread(proc.terminate)
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed < 5, f"took {elapsed:.1f}s, Docker allows 10"
        assert await alice.closed() == 1001
        assert await bob.closed() == 1001
    log = "".join(proc.log)
    assert "database closed" in log
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT body FROM messages").fetchall() == [("before shutdown",)]


async def test_kill_9_mid_burst_loses_no_acknowledged_message(
    proc: ServerProcess, db: Path
) -> None:
    acked: dict[str, int] = {}
    secrets: dict[str, str] = {}

    async def blast(name: str) -> None:
        try:
            async with peer(proc.url, name) as p:
                secrets[name] = p.welcome["secret"]
                for n in range(100_000):
                    cid = f"{name}-{n}"
                    await p.send({"type": "send", "cid": cid, "room": "lobby", "body": cid})
                    if n % 20 == 0:  # read what came in, recording acks
                        for frame in await p.quiet(0.001):
                            if frame["type"] == "ack":
                                acked[frame["cid"]] = frame["id"]
        except (ConnectionClosed, OSError):
            pass

    tasks = [asyncio.create_task(blast(f"n{i}")) for i in range(4)]
    while len(acked) < 500:
        await asyncio.sleep(0.01)
    proc.kill()  # SIGKILL: no shutdown, no flush
    await asyncio.gather(*tasks)
    assert len(acked) >= 500
    proc.start()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = dict(conn.execute("SELECT cid, id FROM messages").fetchall())
        dupes = conn.execute("SELECT COUNT(*) - COUNT(DISTINCT cid) FROM messages").fetchone()
    assert dupes == (0,)
    missing = [cid for cid, msg_id in acked.items() if stored.get(cid) != msg_id]
    assert missing == []
    # A client resuming from nothing gets every stored message once, in order: the
    # newest up to the cap, then the rest by paging back from the gap.
    async with peer(proc.url, "n1", secret=secrets["n1"], resume=0) as p:
        ids = [f["id"] for f in p.catchup if f["type"] == "msg"]
        gaps = [f for f in p.catchup if f["type"] == "gap"]
        before = gaps[0]["before"] if gaps else None
        while before is not None:
            await p.send({"type": "history", "room": "lobby", "before": before, "limit": 200})
            page = await p.expect("history")
            ids = [m["id"] for m in page["messages"]] + ids
            before = page["messages"][0]["id"] if page["more"] else None
    assert ids == sorted(stored.values())


async def test_live_backup_under_write_load(tmp_path: Path) -> None:
    from tests.helpers import server

    db = tmp_path / "live.db"
    acked: dict[str, int] = {}
    stop = asyncio.Event()
    async with server(db, **NO_LIMITS) as chat:

        async def writer(name: str) -> None:
            async with peer(chat, name) as p:
                n = 0
                while not stop.is_set():
                    acked[f"{name}-{n}"] = (await p.say(f"{name}-{n}", cid=f"{name}-{n}"))["id"]
                    n += 1

        tasks = [asyncio.create_task(writer(f"w{i}")) for i in range(3)]
        while len(acked) < 300:
            await asyncio.sleep(0.01)
        before = dict(acked)  # acknowledged before the backup began
        dest = tmp_path / "backup.db"
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "chat_server.backup", "--db", str(db), str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        stop.set()
        await asyncio.gather(*tasks)
    assert done.returncode == 0, done.stderr
    assert "integrity_check: ok" in done.stdout
    assert len(acked) > len(before), "writes went on during the backup"
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        copied = dict(conn.execute("SELECT cid, id FROM messages").fetchall())
    assert all(copied.get(cid) == msg_id for cid, msg_id in before.items())


def test_backup_takes_the_server_s_database_setting(tmp_path: Path) -> None:
    """``CHAT_DB`` as the server reads it: ``sqlite:///`` is copied; a PostgreSQL URL gets
    a pointer to pg_dump, never the password in the message."""
    db = tmp_path / "chat.db"

    async def create() -> None:
        async with server(db):
            pass

    asyncio.run(create())
    dest = tmp_path / "copy.db"

    def run(setting: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "chat_server.backup", "--db", setting, str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run(f"sqlite:///{db}")
    assert done.returncode == 0, done.stderr
    assert "integrity_check: ok" in done.stdout
    done = run("postgresql://chat:s3cret@postgres:5432/chat")
    assert done.returncode == 2
    assert "pg_dump" in done.stderr and "s3cret" not in done.stderr + done.stdout


async def test_sigterm_with_idle_half_open_and_silent_sockets_exits_0_within_3s(
    proc: ServerProcess,
) -> None:
    """Whatever sockets are open, the server is gone well inside Docker's 10 s grace."""
    loop = asyncio.get_running_loop()
    idle = socket.create_connection(("127.0.0.1", proc.port))  # never says a word
    partial = socket.create_connection(("127.0.0.1", proc.port))
    partial.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # and stops
    silent = await connect(proc.url, ping_interval=None)
    try:
        assert silent.transport is not None
        silent.transport.pause_reading()  # it will never answer the close
        async with peer(proc.url, "alice") as alice:
            await alice.say("before shutdown")
            started = time.monotonic()
            code = await asyncio.to_thread(proc.terminate)
            elapsed = time.monotonic() - started
            assert code == 0
            assert elapsed < 3, f"took {elapsed:.1f}s"
            assert await alice.closed() == 1001
        for sock in (idle, partial):
            sock.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(sock, 1), 2) == b""
    finally:
        idle.close()
        partial.close()
        silent.transport.abort()


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def _healthz_seconds(port: int) -> float:
    """Seconds /healthz took to answer 200 (it fails the test if it does not)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    return time.monotonic() - started


async def test_a_flood_of_silent_sockets_cannot_use_up_the_open_files(db: Path) -> None:
    """Out of file descriptors, the server neither floods its log nor stops answering:
    it starts with its soft open-file limit raised to the hard one, keeps connections
    below it, and drops the oldest silent handshakes to let new connections in."""
    proc = ServerProcess(db, *NO_LIMIT_FLAGS, nofile=(100, 160)).start()
    loop = asyncio.get_running_loop()
    flood: list[socket.socket] = []
    try:
        assert proc.proc is not None
        assert _open_files_limit(proc.proc.pid) == (160, 160)
        for n in range(600):  # far past 160 files, from 60 addresses
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((f"127.0.4.{1 + n % 60}", 0))
            try:
                await loop.sock_connect(sock, ("127.0.0.1", proc.port))
            except OSError:
                sock.close()
                continue
            flood.append(sock)
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_healthz_seconds, proc.port) < 2.0
        async with peer(proc.url, "alice") as alice:
            await alice.say("still chatting")
        await asyncio.sleep(1.0)
    finally:
        for sock in flood:
            sock.close()
        proc.stop()
    log = "".join(proc.log)
    assert "open-file limit raised from 100 to 160" in log
    assert len(proc.log) < 60, f"{len(proc.log)} log lines:\n" + "".join(proc.log[-20:])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc")


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_memory_comes_back_after_clients_pipeline_history_and_never_read(db: Path) -> None:
    """The outside attack's histhold.py: rounds of 200 connections that pipeline 20
    history requests each with a 2 KiB receive buffer, never read, and hang up. RSS must
    come back near its baseline after each round (it grew 25-45 MiB a round). On
    asyncio's own loop: its transports buffer unsent bytes in a growing bytearray."""
    proc = ServerProcess(db, *NO_LIMIT_FLAGS, uvloop=False).start()
    loop = asyncio.get_running_loop()
    rooms = [f"big{n}" for n in range(8)]
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        async with peer(proc.url, "filler", rooms=rooms) as filler:
            for n in range(64):  # 24 KiB each on the wire: replies of 128 KiB
                await filler.say("\x01" * 4000, room=rooms[n % 8])
        await asyncio.sleep(0.5)
        baseline = _rss_mib(pid)
        after: list[float] = []
        for round_ in range(3):
            clients = []
            for n in range(200):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", proc.port))
                await loop.sock_sendall(sock, HANDSHAKE)
                assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
                nick = f"h{round_}x{n}"
                frames = [{"type": "hello", "nick": nick, "rooms": [], "history": 0}]
                frames += [{"type": "history", "room": rooms[k % 8]} for k in range(20)]
                await loop.sock_sendall(
                    sock,
                    b"".join(
                        WsFrame(Opcode.TEXT, json.dumps(f).encode()).serialize(mask=True)
                        for f in frames
                    ),
                )
                clients.append(sock)
            await asyncio.sleep(2.0)
            for sock in clients:
                sock.close()
            await asyncio.sleep(2.0)
            after.append(_rss_mib(pid) - baseline)
        async with peer(proc.url, "after") as p:
            await p.say("still fine")
    finally:
        proc.stop()
    assert max(after) < 15, f"RSS above its {baseline:.0f} MiB baseline after each round: {after}"
