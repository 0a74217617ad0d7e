"""Abuse at the connection level: floods of connections, half-open sockets, huge handshakes,
and random frames (property-based). Legitimate clients must keep chatting throughout."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat_protocol import ErrorCode
from chat_server.throttle import LogThrottle
from tests.helpers import NO_LIMITS, peer, server, url


async def test_connections_per_ip_are_limited(db: Path) -> None:
    async with server(db, max_connections_per_ip=5) as chat:
        opened = [await connect(url(chat)) for _ in range(5)]
        try:
            try:
                await connect(url(chat))
            except InvalidStatus as refused:
                assert refused.response.status_code == 429
            else:
                raise AssertionError("the sixth connection was accepted")
        finally:
            for ws in opened:
                await ws.close()
        await asyncio.sleep(0.1)
        async with peer(chat, "after") as p:  # room again once they closed
            await p.say("fine")


async def test_kicking_many_flooders_logs_one_line_per_interval(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each flooder is closed with 1008, but the warning is written once per interval
    (with a count of the rest), not once per connection: an attack cannot flood the log."""
    async with server(db, rate=1.0, burst=1, flood_strikes=2) as chat:
        for n in range(12):
            async with connect(url(chat)) as ws:
                for _ in range(5):
                    await ws.send(json.dumps({"type": "who", "room": "lobby"}))
                try:
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1008, n
        async with peer(chat, "after") as p:  # others still get in
            assert p.welcome["nick"] == "after"
    kicks = [r for r in caplog.records if "flooding" in r.getMessage()]
    assert len(kicks) == 1, [r.getMessage() for r in kicks]


def test_the_log_throttle_counts_what_it_left_out() -> None:
    now = [0.0]
    logger = logging.getLogger("tests.throttle")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        throttle = LogThrottle(logger, interval=10.0, clock=lambda: now[0])
        for n in range(5):
            now[0] = n
            throttle.warning("a", "refused %s", n)
        throttle.warning("b", "another kind")
        now[0] = 12.0
        throttle.warning("a", "refused %s", "late")
    finally:
        logger.removeHandler(handler)
    assert records == [
        "refused 0",
        "another kind",
        "refused late (and 4 more like this in the last 12 s)",
    ]


async def test_half_open_connections_time_out_and_others_chat(db: Path) -> None:
    async with server(db, handshake_timeout=1.0, max_connections_per_ip=0) as chat:
        loop = asyncio.get_running_loop()
        idle = []
        for _ in range(200):  # TCP connected, no HTTP request ever
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", chat.port))
            idle.append(sock)
        async with peer(chat, "alive") as p:
            await p.say("still works")
        await asyncio.sleep(2.0)
        closed = 0
        for sock in idle:
            try:
                closed += await asyncio.wait_for(loop.sock_recv(sock, 1), 1) == b""
            finally:
                sock.close()
        assert closed == 200


async def test_oversized_handshake_is_refused(db: Path) -> None:
    async with server(db) as chat:
        reader, writer = await asyncio.open_connection("127.0.0.1", chat.port)
        writer.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status == b"" or status.split()[1] in (b"400", b"431")
        async with peer(chat, "normal") as p:
            await p.say("unaffected")


# Frames of every shape: right and wrong types, sizes and strange Unicode (lone
# surrogates included: json.dumps sends them escaped, as a hostile client could).
TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=50
) | st.sampled_from(
    ["", " ", "\x00", "\u2028", "e\u0301\u0301\u0301", "\u202eabc", "#lobby", "\ud800", "a\udfffb"]
)
VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)
FRAME = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["hello", "send", "join", "leave", "nick", "who", "rooms", "history", "x"]
        )
    },
    optional={
        "nick": VALUE,
        "room": VALUE,
        "rooms": VALUE,
        "to": VALUE,
        "with": VALUE,
        "cid": VALUE,
        "body": VALUE,
        "secret": VALUE,
        "resume": VALUE,
        "before": VALUE,
        "limit": VALUE,
        "ref": VALUE,
        "action": VALUE,
        "history": VALUE,
    },
)
DOCUMENTED = {code.value for code in ErrorCode}
REPLIES = {
    "ack",
    "msg",
    "joined",
    "history",
    "left",
    "renamed",
    "members",
    "rooms",
    "presence",
    "welcome",
    "synced",
    "gap",
    "error",
}


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(FRAME, min_size=1, max_size=6))
def test_fuzzed_frames_get_documented_answers_only(frames: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_fuzzed(Path(tmp) / "chat.db", frames)


def check_fuzzed(db: Path, frames: list[dict[str, Any]]) -> None:
    async def run() -> None:
        async with server(db, **NO_LIMITS) as chat:
            async with peer(chat, "fuzz") as fuzz, peer(chat, "witness") as witness:
                await witness.quiet(0.05)
                for frame in frames:
                    await fuzz.ws.send(json.dumps(frame))
                for reply in await fuzz.quiet(0.2):
                    assert reply["type"] in REPLIES, reply
                    if reply["type"] == "error":
                        assert reply["code"] in DOCUMENTED, reply
                        assert reply["message"]
                await witness.say("the witness still chats")

    asyncio.run(run())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT body, room, recipient FROM messages").fetchall()
    for body, room, recipient in rows:
        assert isinstance(body, str) and body.strip()
        assert len(body) <= 4000
        assert (room is None) != (recipient is None)


@settings(max_examples=60, deadline=None)
@given(
    body=st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=300
    ).filter(lambda b: b.strip())
)
def test_valid_unicode_bodies_round_trip_exactly(body: str) -> None:
    async def run(db: Path) -> None:
        async with server(db) as chat, peer(chat, "a") as a, peer(chat, "b") as b:
            await a.quiet(0.05)
            await a.say(body)
            got = await b.expect("msg")
            assert got["body"] == body
            await b.send({"type": "history", "room": "lobby", "limit": 1})
            assert (await b.expect("history"))["messages"][0]["body"] == body

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "chat.db"))
