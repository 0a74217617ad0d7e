"""Attacks from outside (issue 10): one frame must never stop the server, a departed
client's work must stop, limits must hold across connections, and the operational
promises (shutdown, backup, /healthz) must hold whatever clients do.

Tests that take ``db`` run on both stores (``tests/stores.py``); those about one SQLite
file (backup, memory of a mass join, framing) take ``sqlite_db``."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import json
import math
import socket
import sqlite3
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

import chat_server.backends.postgres
import chat_server.backends.sqlite
import chat_server.session
from chat_protocol.frames import History, Leave, Who
from chat_server.app import ChatServer
from tests.helpers import NO_LIMIT_FLAGS, NO_LIMITS, Frame, Peer, peer, server, url
from tests.procs import ServerProcess
from tests.stores import db_on_both_stores, db_rows  # noqa: F401 (db: SQLite and PostgreSQL)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: Any) -> list[int]:
    """Make ``owner.name`` (or ``owner[name]`` of a dict) raise once, then behave again;
    the list counts the calls."""
    original = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure in {name}")

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            return await original(*args, **kwargs)

        replacement: Any = async_wrapper
    else:

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            return original(*args, **kwargs)

        replacement = wrapper
    if isinstance(owner, dict):
        monkeypatch.setitem(owner, name, replacement)
    else:
        monkeypatch.setattr(owner, name, replacement)
    return calls


async def answer(p: Peer, ref: str) -> Frame:
    """The answer carrying this ref, past live traffic."""
    while True:
        frame = await p.recv()
        if frame.get("ref") == ref:
            return frame


def health(chat: ChatServer) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{chat.port}/healthz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as error:
        return error.code


# --- 1. no exception in one request stops the writer or the server --------------------


async def test_a_failure_in_any_writer_operation_costs_that_request_only(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: Any
    if isinstance(db, Path):
        store, batch_step, rooms_step = chat_server.backends.sqlite, "channel_of", "executemany"
    else:
        store, batch_step, rooms_step = chat_server.backends.postgres, "channel_of", "_now_ms"
    async with server(db, **NO_LIMITS) as chat, peer(chat, "alice") as alice:
        # A batch of messages.
        fail_once(monkeypatch, store, batch_step)
        await alice.send({"type": "send", "cid": "m1", "room": "lobby", "body": "x", "ref": "1"})
        error = await answer(alice, "1")
        assert (error["type"], error["code"], error["cid"]) == ("error", "internal", "m1")
        await alice.send({"type": "send", "cid": "m1", "room": "lobby", "body": "x", "ref": "2"})
        assert (await answer(alice, "2"))["type"] == "ack"
        # A nick claim (where a lone surrogate once stopped every write).
        fail_once(monkeypatch, store, "_hash_secret")
        await alice.send({"type": "nick", "nick": "alice2", "ref": "3"})
        assert (await answer(alice, "3"))["code"] == "internal"
        await alice.send({"type": "nick", "nick": "alice2", "ref": "4"})
        assert (await answer(alice, "4"))["type"] == "renamed"
        # Creating rooms.
        fail_once(
            monkeypatch, aiosqlite.Connection if rooms_step == "executemany" else store, rooms_step
        )
        await alice.send({"type": "join", "room": "new", "ref": "5"})
        assert (await answer(alice, "5"))["code"] == "internal"
        await alice.send({"type": "join", "room": "new", "ref": "6"})
        assert (await answer(alice, "6"))["type"] == "joined"
        # The /healthz probe.
        await asyncio.sleep(1.1)
        fail_once(monkeypatch, store, "_now_ms")
        assert await asyncio.to_thread(health, chat) == 503
        await asyncio.sleep(1.1)
        assert await asyncio.to_thread(health, chat) == 200
        # The listener that fans a committed batch out: stored, so a resend gets its id.
        fail_once(monkeypatch, chat, "committed")
        await alice.send({"type": "send", "cid": "m2", "room": "new", "body": "y", "ref": "7"})
        assert (await answer(alice, "7"))["code"] == "internal"
        await alice.send({"type": "send", "cid": "m2", "room": "new", "body": "y", "ref": "8"})
        ack = await answer(alice, "8")
        assert ack["type"] == "ack"
        await alice.say("and the writer still writes", room="new")
    cids = [cid for (cid,) in await db_rows(db, "SELECT cid FROM messages ORDER BY id")]
    assert cids[:2] == ["m1", "m2"] and len(cids) == 3  # each stored once


async def test_a_failure_in_a_request_handler_costs_that_request_only(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with server(db, **NO_LIMITS) as chat, peer(chat, "alice") as alice:
        handlers = chat_server.session._HANDLERS
        for kind in (Who, History, Leave):
            fail_once(monkeypatch, handlers, kind)
        fail_once(monkeypatch, chat_server.session.Session, "_send")
        fail_once(monkeypatch, chat_server.session, "decode")
        await alice.send({"type": "rooms", "ref": "r"})  # reading this frame fails
        error = await alice.expect("error", code="internal")
        assert "ref" not in error  # the frame could not be read at all
        frames: list[Frame] = [
            {"type": "who", "ref": "w"},
            {"type": "history", "room": "lobby", "ref": "h"},
            {"type": "send", "cid": "c", "room": "lobby", "body": "x", "ref": "s"},
            {"type": "leave", "room": "lobby", "ref": "l"},
        ]
        for frame in frames:
            await alice.send(frame)
            error = await answer(alice, str(frame["ref"]))
            assert error["code"] == "internal", error
        frames.append({"type": "rooms", "ref": "r"})
        for frame in frames:
            await alice.send(frame)
            reply = await answer(alice, str(frame["ref"]))
            assert reply["type"] != "error", reply


async def test_a_catch_up_that_fails_after_welcome_closes_1011_and_nothing_else(
    sqlite_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with server(sqlite_db) as chat, peer(chat, "bob") as bob:
        fail_once(monkeypatch, chat_server.session.Session, "_recent")
        async with peer(chat) as alice:
            await alice.send({"type": "hello", "nick": "alice"})
            await alice.expect("welcome")
            assert await alice.closed() == 1011
        async with peer(chat, "carol") as carol:
            await carol.say("fine")
        await bob.say("fine too")


# --- 2 and 3: races and undecodable frames -----------------------------------------------


async def test_deeply_nested_json_gets_bad_json_and_the_session_stays(sqlite_db: Path) -> None:
    async with server(sqlite_db) as chat, peer(chat) as p:
        await p.ws.send("[" * 1000)
        await p.expect("error", code="bad_json")
        await p.ws.send('{"type":"hello","nick":' + "[" * 20_000 + "]" * 20_000 + "}")
        await p.expect("error", code="bad_json")
        await p.send({"type": "hello", "nick": "nested"})
        await p.expect("welcome")
        await p.until("synced")
        await p.ws.send('{"type":"send","cid":"c","room":"lobby","body":' + "{" * 5000 + "}")
        await p.expect("error", code="bad_json")
        await p.say("still here")


# --- 4. catch-up amplification --------------------------------------------------------------


async def fill(chat: ChatServer, rooms: list[str], count: int, body: str) -> None:
    async with peer(chat, "filler-" + uuid.uuid4().hex[:6], rooms=rooms) as filler:
        for room in rooms:
            for _ in range(count):
                await filler.say(body, room=room)


async def test_a_departed_clients_catch_up_stops(db: Path) -> None:
    """Hellos that ask for everything and hang up at once: the work stops with them."""
    rooms = [f"r{n}" for n in range(32)]
    async with server(db, **NO_LIMITS) as chat:
        await fill(chat, rooms, 12, "\U0001f600" * 4000)
        reads: list[float] = []
        # The one method each store reads messages through.
        store: Any = chat.store
        owner, name = (
            (store._reader, "execute_fetchall") if isinstance(db, Path) else (store, "_fetch")
        )
        original = getattr(owner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(time.monotonic())
            return await original(*args, **kwargs)

        setattr(owner, name, counted)
        for n in range(8):
            ws = await connect(url(chat))
            hello = {"type": "hello", "nick": f"gone{n}", "rooms": rooms, "history": 200}
            await Peer(ws).send(hello)
            await asyncio.sleep(0.05)  # the catch-up is under way
            assert ws.transport is not None
            ws.transport.abort()
        left = time.monotonic()
        await asyncio.sleep(2.0)
        late = [t for t in reads if t > left + 0.1]
        assert len(late) <= 1, f"{len(late)} reads after every client had gone"
        async with peer(chat, "after", rooms=rooms[:2]) as p:
            await p.say("the server is free", room="r0")


async def test_pipelined_history_from_clients_that_never_read_is_bounded_and_freed(
    db: Path,
) -> None:
    """Clients with a tiny receive buffer pipeline 20 history requests each and never
    read, then hang up: the server holds about one reply for each meanwhile, not one per
    request (20 x 128 KiB), and all of it is freed when they go (tracemalloc: Python's
    memory; the RSS side is test_server_process.py's)."""
    rooms = [f"r{n}" for n in range(8)]
    loop = asyncio.get_running_loop()
    async with server(db, **NO_LIMITS) as chat:
        await fill(chat, rooms, 30, "\x01" * 4000)
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            clients = []
            for n in range(60):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", chat.port))
                await loop.sock_sendall(sock, HANDSHAKE)
                assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
                frames = [{"type": "hello", "nick": f"never{n}", "rooms": [], "history": 0}]
                frames += [{"type": "history", "room": rooms[k % 8]} for k in range(20)]
                data = b"".join(
                    WsFrame(Opcode.TEXT, json.dumps(f).encode()).serialize(mask=True)
                    for f in frames
                )
                await loop.sock_sendall(sock, data)
                clients.append(sock)
            await asyncio.sleep(2.0)
            held = tracemalloc.get_traced_memory()[0] - baseline
            for sock in clients:
                sock.close()
            await asyncio.sleep(1.0)
            gc.collect()
            left = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        per_client = held / len(clients)
        assert per_client < 256 * 1024, f"{per_client / 1024:.0f} KiB held per client"
        assert left < 2 * 2**20, f"{left / 2**20:.1f} MiB still held after they left"
        async with peer(chat, "after", rooms=rooms[:1]) as p:
            await p.say("the server is free", room="r0")


async def test_costly_requests_are_limited_per_address(db: Path) -> None:
    rooms = [f"c{n}" for n in range(32)]
    async with server(db) as chat:
        refused = None
        for n in range(10):  # a hello of 32 rooms costs 33 of the 200-unit burst
            async with peer(chat) as p:
                await p.send({"type": "hello", "nick": f"n{n}", "rooms": rooms})
                frame = await p.recv()
                if frame["type"] == "error":
                    refused = frame
                    break
                await p.until("synced")
        assert refused is not None and refused["code"] == "rate_limited"
        assert "catch-ups per address" in refused["message"]
        assert 0 < refused["retry_after"] <= 33 / 20
        await asyncio.sleep(refused["retry_after"])
        async with peer(chat, "later", rooms=rooms) as p:
            assert p.welcome["nick"] == "later"


# --- 5. shutdown ----------------------------------------------------------------------------


async def test_sigterm_exits_0_within_3_s_whatever_sockets_are_open(db: Path) -> None:
    proc = ServerProcess(db).start()
    try:
        loop = asyncio.get_running_loop()
        idle = socket.socket()  # TCP only: never a byte of HTTP
        idle.setblocking(False)
        await loop.sock_connect(idle, ("127.0.0.1", proc.port))
        half = socket.socket()  # a handshake started and never finished
        half.setblocking(False)
        await loop.sock_connect(half, ("127.0.0.1", proc.port))
        await loop.sock_sendall(half, b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with peer(proc.url, "frozen") as frozen, peer(proc.url, "normal") as normal:
            assert frozen.ws.transport is not None
            frozen.ws.transport.pause_reading()  # will never answer the closing handshake
            started = time.monotonic()
            code = await asyncio.to_thread(proc.terminate)
            elapsed = time.monotonic() - started
            assert code == 0
            assert elapsed < 3.0, f"took {elapsed:.2f} s"
            assert await normal.closed() == 1001
            frozen.ws.transport.abort()
        idle.close()
        half.close()
    finally:
        proc.stop()
    assert "database closed" in "".join(proc.log)


# --- 6. backup ----------------------------------------------------------------------------


@pytest.fixture
def big_db(tmp_path: Path) -> Path:
    """A database of 500,000 messages, made through the server's own schema."""
    db = tmp_path / "big.db"

    async def create() -> None:
        async with server(db):
            pass

    asyncio.run(create())
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        body = "the quick brown fox jumps over the lazy dog; " * 4
        conn.executemany(
            "INSERT INTO messages (id, ts, channel, room, sender_key, sender, action, body, cid)"
            " VALUES (?, 0, '#lobby', 'lobby', 'seed', 'seed', 0, ?, ?)",
            ((n, body, f"seed-{n}") for n in range(1, 500_001)),
        )
    return db


def test_backup_finishes_on_500k_messages_under_writes(big_db: Path, tmp_path: Path) -> None:
    async def run() -> tuple[subprocess.CompletedProcess[str], float, int]:
        acked: list[int] = []
        stop = asyncio.Event()
        async with server(big_db, **NO_LIMITS) as chat:

            async def writer() -> None:
                async with peer(chat, "w", history=0) as p:
                    while not stop.is_set():
                        acked.append((await p.say("during the backup"))["id"])
                        await asyncio.sleep(0.02)  # about 40 messages a second

            task = asyncio.create_task(writer())
            while len(acked) < 20:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "chat_server.backup", "--db", str(big_db), str(dest)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            elapsed = time.monotonic() - started
            stop.set()
            await task
        return done, elapsed, len(acked)

    dest = tmp_path / "backup.db"
    done, elapsed, writes = asyncio.run(run())
    assert done.returncode == 0, done.stderr
    assert "integrity_check: ok" in done.stdout
    assert writes > 20 + 10, "writes went on during the backup"
    with sqlite3.connect(dest) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] >= 500_020
    assert elapsed < 60


# --- 7. growth and storms -------------------------------------------------------------------


async def test_the_message_rate_per_nick_survives_reconnects(db: Path) -> None:
    async with server(db, rate=20.0, burst=40, address_rate=0) as chat:
        async with peer(chat, "fast") as p:
            secret = p.welcome["secret"]
        started = time.monotonic()
        acked = limited = 0
        for round_ in range(6):  # reconnect, burst, repeat: the bucket is the nick's
            async with peer(chat, "fast", secret=secret, history=0) as p:
                for n in range(40):
                    cid = f"{round_}-{n}"
                    await p.send({"type": "send", "cid": cid, "room": "lobby", "body": "x"})
                for frame in await p.quiet(0.3):
                    acked += frame["type"] == "ack"
                    limited += frame.get("code") == "rate_limited"
        elapsed = time.monotonic() - started
        assert acked <= 40 + 20 * elapsed + 2, (acked, elapsed)
        assert limited == 240 - acked


async def test_the_message_rate_per_address_spans_nicks(db: Path) -> None:
    async with server(db, rate=1000.0, burst=1000, address_rate=10.0, address_burst=20) as chat:
        started = time.monotonic()
        acked = 0
        for n in range(5):
            async with peer(chat, f"nick{n}", history=0) as p:
                for m in range(10):
                    await p.send({"type": "send", "cid": f"c{m}", "room": "lobby", "body": "x"})
                frames = await p.quiet(0.2)
                acked += sum(f["type"] == "ack" for f in frames)
                errors = [f for f in frames if f["type"] == "error"]
                assert all("messages per address" in f["message"] for f in errors)
        elapsed = time.monotonic() - started
        assert acked <= 20 + 10 * elapsed + 1, (acked, elapsed)


async def test_a_short_wait_is_said_in_milliseconds_never_0_0_s(db: Path) -> None:
    """A wait under a second reads "try again in 15 ms", matching retry_after, not "0.0 s"."""
    async with server(db, rate=1000.0, burst=1000, address_rate=50.0, address_burst=1) as chat:
        async with peer(chat, "quick", history=0) as p:
            for m in range(3):
                await p.send({"type": "send", "cid": f"c{m}", "room": "lobby", "body": "x"})
            errors = [f for f in await p.quiet(0.2) if f["type"] == "error"]
            assert errors, "the address rate refused nothing"
            for error in errors:
                assert error["code"] == "rate_limited"
                wait = error["retry_after"]
                assert 0 < wait < 1
                ms = math.ceil(wait * 1000 - 1e-6)
                assert error["message"].endswith(f"try again in {ms} ms"), error


async def test_new_rooms_and_nick_registrations_have_quotas(db: Path) -> None:
    async with server(db, rooms_per_hour=5, nicks_per_hour=3) as chat:
        async with peer(chat, "a", rooms=["lobby", "r1", "r2", "r3"]) as a:  # four new rooms
            await a.send({"type": "join", "room": "r4", "ref": "5"})
            assert (await answer(a, "5"))["type"] == "joined"
            await a.send({"type": "join", "room": "r5", "ref": "7"})
            error = await answer(a, "7")
            assert error["code"] == "rate_limited" and "new rooms" in error["message"]
            assert 600 < error["retry_after"] <= 720
            await a.send({"type": "join", "room": "r1", "ref": "6"})  # not new: no quota
            assert (await answer(a, "6"))["type"] == "joined"
            secret = a.welcome["secret"]
        async with peer(chat, "b"), peer(chat, "c"):
            pass
        async with peer(chat) as d:
            await d.send({"type": "hello", "nick": "d"})
            error = await d.expect("error", code="rate_limited")
            assert "nick registrations" in error["message"]
        async with peer(chat, "a", secret=secret) as a:  # a registered nick still comes back
            await a.say("back")


async def test_a_mass_join_costs_linear_presence_frames(sqlite_db: Path) -> None:
    """300 clients join one room at once: about N presence frames, not N² (issue 10.7)."""
    count = 300
    async with server(sqlite_db, **NO_LIMITS) as chat:
        sockets = [await connect(url(chat), max_size=None) for _ in range(count)]
        try:
            peers = [Peer(ws) for ws in sockets]

            async def join(p: Peer, nick: str) -> list[Frame]:
                await p.send({"type": "hello", "nick": nick, "history": 0})
                return await p.until("synced", timeout=60)

            catchups = await asyncio.gather(*(join(p, f"m{n}") for n, p in enumerate(peers)))

            async def view(p: Peer, catchup: list[Frame]) -> tuple[int, set[str]]:
                frames = catchup + await p.quiet(0.5)
                joined = next(f for f in frames if f["type"] == "joined")
                presence = [f for f in frames if f["type"] == "presence"]
                return len(presence), set(joined["members"]).union(
                    *(f.get("nicks") or [f["nick"]] for f in presence)
                )

            results = await asyncio.gather(
                *(view(p, c) for p, c in zip(peers, catchups, strict=True))
            )
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        everyone = {f"m{n}" for n in range(count)}
        assert all(members == everyone for _, members in results)
        frames = sum(n for n, _ in results)
        assert frames <= 20 * count, f"{frames} presence frames for {count} joins"


async def test_healthz_is_cached_and_limited_per_address(db: Path) -> None:
    async with server(db, http_rate=5.0, http_burst=40) as chat:
        probes = 0
        original = chat.store.probe

        async def counted() -> None:
            nonlocal probes
            probes += 1
            await original()

        chat.store.probe = counted  # type: ignore[method-assign]
        codes = await asyncio.gather(*(asyncio.to_thread(health, chat) for _ in range(30)))
        assert set(codes) == {200}
        assert probes <= 2, f"{probes} probe writes for 30 checks within a second"
        codes = [await asyncio.to_thread(health, chat) for _ in range(20)]
        assert 429 in codes
        # A WebSocket handshake from the same address is limited the same way.
        with pytest.raises(InvalidStatus) as refused:
            await connect(url(chat))
        assert refused.value.response.status_code == 429


async def test_an_unconfirmed_registration_expires_but_keeps_its_messages_private(
    db: Path,
) -> None:
    async with server(db, nick_claim_ttl=1.0) as chat:
        async with peer(chat, "alice"), peer(chat, "bob") as bob:  # alice: a server secret
            await bob.say("for alice only", to="alice")
            confirmed_secret = bob.welcome["secret"]
        async with peer(chat, "bob", secret=confirmed_secret):  # presenting it confirms it
            pass
        async with peer(chat) as p:
            await p.send({"type": "hello", "nick": "alice"})
            await p.expect("error", code="nick_taken")  # too early
        await asyncio.sleep(1.1)
        async with peer(chat, "alice") as newcomer:
            assert newcomer.welcome.get("registered") is True
            direct = next(f for f in newcomer.catchup if f.get("direct"))
            assert direct["messages"] == []
            await newcomer.send({"type": "history", "with": "bob", "ref": "h"})
            assert (await answer(newcomer, "h"))["messages"] == []
        async with peer(chat) as p:
            await p.send({"type": "hello", "nick": "bob"})
            await p.expect("error", code="nick_taken")  # confirmed: never expires
        async with peer(chat, "bob", secret=confirmed_secret) as bob:
            await bob.send({"type": "history", "with": "alice", "ref": "h"})
            assert [m["body"] for m in (await answer(bob, "h"))["messages"]] == ["for alice only"]


async def test_the_next_holder_of_an_expired_nick_gets_its_own_message_for_a_used_cid(
    db: Path,
) -> None:
    """cids are unique per holder of a nick, not per spelling: after an unconfirmed
    registration expires, its next holder sending the same cid gets a new message stored
    and acknowledged, never the old holder's id and ts (found by an outside tester)."""
    async with server(db, nick_claim_ttl=1.0) as chat:
        async with peer(chat, "alice") as old:  # a server-made secret, never presented again
            first = await old.say("the old holder's words", cid="c1")
        await asyncio.sleep(1.1)
        secret = "n" + uuid.uuid4().hex
        async with peer(chat, "alice", secret=secret) as new, peer(chat, "watch") as watch:
            assert new.welcome.get("registered") is True
            ack = await new.say("the new holder's words", cid="c1")
            assert ack["id"] > first["id"]
            got = await watch.until("msg")
            assert [(m["id"], m["body"]) for m in got if m["type"] == "msg"] == [
                (ack["id"], "the new holder's words")
            ]
            again = await new.say("the new holder's words", cid="c1")  # a retry: the same
            assert (again["id"], again["ts"]) == (ack["id"], ack["ts"])
    rows = await db_rows(
        db, "SELECT id, body FROM messages WHERE sender_key = ? ORDER BY id", "alice"
    )
    assert [body for _, body in rows] == ["the old holder's words", "the new holder's words"]
    assert rows[0][0] == first["id"]


@pytest.mark.parametrize("catchup", ["history", "resume"])
async def test_the_next_holder_of_an_expired_nick_never_sees_the_old_holders_cids(
    db: Path, catchup: str
) -> None:
    """The retired cids (``~<id>``) reach the next holder's catch-up also from the
    server's caches, which encoded the old holder's messages before they were retired:
    a client takes a message of its own nick with one of its pending cids for that
    message come back, and would drop it unsent."""
    async with server(db, nick_claim_ttl=1.0) as chat:
        async with peer(chat, "alice") as old:  # a server-made secret, never presented again
            first = await old.say("the old holder's words", cid="c1")
        await asyncio.sleep(1.1)
        secret = "n" + uuid.uuid4().hex
        resume = 0 if catchup == "resume" else None
        async with peer(chat, "alice", secret=secret, resume=resume) as new:
            assert new.welcome.get("registered") is True
            shown = [f for f in new.catchup if f["type"] == "msg"]
            for frame in new.catchup:
                if frame["type"] == "history":
                    shown += frame["messages"]
    assert [(m["id"], m["cid"]) for m in shown] == [(first["id"], f"~{first['id']}")]


def test_no_limits_flags_match_the_settings() -> None:
    """The flags the tests use to lift limits are real server flags."""
    done = subprocess.run(
        [sys.executable, "-m", "chat_server", *NO_LIMIT_FLAGS, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


async def test_shutdown_ends_even_a_request_that_never_returns(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The class of bug behind a shutdown that hangs: a connection's task that never
    returns. The shutdown cancels it rather than wait."""

    cancelled: list[bool] = []

    async def stuck(self: object, slot: object, request: object) -> None:
        try:
            await asyncio.Event().wait()  # never notices anything
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    monkeypatch.setattr(chat_server.session.Session, "_handle", stuck)
    async with server(db) as chat:
        ws = await connect(url(chat))
        await ws.send(json.dumps({"type": "hello", "nick": "alice"}))
        await asyncio.sleep(0.2)
        assert chat.server is not None and chat.server.tasks  # the request is running
        started = time.monotonic()
    elapsed = time.monotonic() - started
    ws.transport.abort()
    assert elapsed < 3.0, f"took {elapsed:.1f} s"
    assert cancelled == [True]  # stopped, not left running behind the shutdown
