"""Test helpers: a real server in this process, and a raw protocol peer."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat_server.app import ChatServer, running_server
from chat_server.config import ServerConfig

Frame = dict[str, Any]


#: Every rate limit and quota out of the way, for tests about something else (throughput,
#: buffers, races) that send from one address faster than any person would.
NO_LIMITS: dict[str, Any] = {
    "rate": 100_000.0,
    "burst": 100_000,
    "address_rate": 0.0,
    "catchup_rate": 0.0,
    "rooms_per_hour": 0,
    "nicks_per_hour": 0,
    "http_rate": 0.0,
    "max_connections_per_ip": 0,
}
NO_LIMIT_FLAGS = [
    arg for name, value in NO_LIMITS.items() for arg in ("--" + name.replace("_", "-"), str(value))
]


def test_config(db: Path, **overrides: Any) -> ServerConfig:
    return replace(ServerConfig(host="127.0.0.1", port=0, db=db, synchronous="NORMAL"), **overrides)


@asynccontextmanager
async def server(db: Path, **overrides: Any) -> AsyncIterator[ChatServer]:
    async with running_server(test_config(db, **overrides)) as chat:
        yield chat


class Peer:
    """A hand-driven protocol client: exactly the frames we send, all the frames we get."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: Frame = {}

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout):
            data = await self.ws.recv()
        assert isinstance(data, str), "the server must send text frames"
        frame: Frame = json.loads(data)
        return frame

    async def expect(self, kind: str, timeout: float = 5.0, **fields: Any) -> Frame:
        """The next frame of this type (and fields), skipping presence events only."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == "presence" and kind != "presence":
                continue
            assert frame["type"] == kind, f"expected {kind}, got {frame}"
            for key, value in fields.items():
                assert frame.get(key) == value, f"{key}: expected {value!r} in {frame}"
            return frame

    async def until(self, kind: str, timeout: float = 5.0) -> list[Frame]:
        """Every frame up to and including the next one of this type."""
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if frame["type"] == kind:
                return frames

    async def say(
        self,
        body: str,
        room: str = "lobby",
        cid: str | None = None,
        to: str | None = None,
        action: bool = False,
    ) -> Frame:
        """Send to a room (or a nick) and wait for the ack; ``action``: a ``/me``."""
        cid = cid or uuid.uuid4().hex
        target = {"to": to} if to else {"room": room}
        extra = {"action": True} if action else {}
        await self.send({"type": "send", "cid": cid, "body": body, **target, **extra})
        while True:
            frame = await self.recv()
            if frame["type"] == "ack" and frame["cid"] == cid:
                return frame
            assert frame["type"] != "error", frame

    async def closed(self, timeout: float = 5.0) -> int:
        """Read until the server closes; the close code it sent."""
        try:
            while True:
                await self.recv(timeout)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return closed.rcvd.code

    async def quiet(self, seconds: float = 0.3) -> list[Frame]:
        """Whatever arrives within a short time (for asserting that nothing does)."""
        frames = []
        try:
            while True:
                frames.append(await self.recv(seconds))
        except TimeoutError:
            return frames


def url(chat: ChatServer) -> str:
    return f"ws://127.0.0.1:{chat.port}"


@asynccontextmanager
async def peer(
    chat_or_url: ChatServer | str,
    nick: str | None = None,
    *,
    secret: str | None = None,
    rooms: list[str] | None = None,
    resume: int | None = None,
    history: int | None = None,
) -> AsyncIterator[Peer]:
    """Connect; with a nick, say hello and read up to ``synced``."""
    target = chat_or_url if isinstance(chat_or_url, str) else url(chat_or_url)
    async with connect(target, max_size=None) as ws:
        p = Peer(ws)
        if nick is not None:
            hello: Frame = {"type": "hello", "nick": nick}
            for key, value in (("secret", secret), ("rooms", rooms), ("resume", resume)):
                if value is not None:
                    hello[key] = value
            if history is not None:
                hello["history"] = history
            await p.send(hello)
            p.welcome = await p.expect("welcome")
            p.catchup = await p.until("synced")
        yield p


@dataclass(eq=False)
class FakeMember:
    """A hub member without a real connection (the hub's and the cluster's unit tests): it
    remembers every close it was asked for, (code, reason)."""

    nick: str
    link: object = None
    hold: object = None
    rooms: list[str] = field(default_factory=list)
    kicked: list[tuple[int, str]] = field(default_factory=list)

    @property
    def nick_key(self) -> str:
        return self.nick.lower()

    def kick(self, code: int, reason: str) -> None:
        self.kicked.append((code, reason))
