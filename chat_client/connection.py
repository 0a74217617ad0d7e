"""The client's link to the server: connect, hello, resume, resend, reconnect.

It knows the protocol and nothing of screens: every frame from the server is handed to
``on_frame`` and every change of link state to ``on_status``. What it keeps is what a
reconnect needs: the nick, the rooms, the highest message id seen, and an outbox of
messages not yet acknowledged, which are sent again (same ``cid``, so the server stores
each once) after every reconnect.

The reconnect loop is written here rather than taken from ``websockets.connect``'s
iterator because the user must see *when* the next try is, and because some closes
(4001: another client took this nick over) must not be retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from chat_client.secrets import SecretStore
from chat_protocol import CloseCode
from chat_protocol.names import nick_key

log = logging.getLogger(__name__)

Frame = dict[str, Any]


class LinkState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Status:
    state: LinkState
    detail: str = ""
    retry_at: float | None = None  # time.monotonic() of the next attempt


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: a retry waits uniform(0, cap) seconds."""

    first: float = 0.5
    factor: float = 2.0
    most: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(self.first, min(self.most, self.first * self.factor**attempt))


class ChatConnection:
    def __init__(
        self,
        url: str,
        nick: str,
        rooms: list[str],
        secrets: SecretStore,
        *,
        on_frame: Callable[[Frame], None],
        on_status: Callable[[Status], None],
        trace: Callable[[str, str], None] | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.url = url
        self.nick = nick
        self.rooms = list(rooms)
        self.secrets = secrets
        self.last_id = 0
        self.outbox: dict[str, Frame] = {}
        self.on_frame = on_frame
        self.on_status = on_status
        self.trace = trace
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff = backoff
        self.status = Status(LinkState.OFFLINE)
        self.welcomed = False
        self.synced = False
        self._queue: asyncio.Queue[Frame] | None = None
        self._stop = asyncio.Event()

    # --- what the rest of the client calls -------------------------------------------------

    def send_message(
        self, body: str, *, room: str | None = None, to: str | None = None, action: bool = False
    ) -> str:
        """Queue a message; it is (re)sent until acknowledged. Returns its cid."""
        cid = uuid.uuid4().hex
        frame: Frame = {"type": "send", "cid": cid, "body": body, "action": action}
        frame.update({"room": room} if room is not None else {"to": to})
        self.outbox[cid] = frame
        if self.synced:
            self._put(frame)
        return cid

    def request(self, frame: Frame) -> bool:
        """Send a request now; False when offline (requests are not queued)."""
        if not self.synced:
            return False
        self._put(frame)
        return True

    def join(self, room: str) -> None:
        if room not in self.rooms:
            self.rooms.append(room)
        self.request({"type": "join", "room": room})

    def leave(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.remove(room)
        self.request({"type": "leave", "room": room})

    def change_nick(self, nick: str) -> None:
        frame: Frame = {"type": "nick", "nick": nick}
        if self.welcomed:
            secret = self.secrets.get(self.url, nick)
            if secret:
                frame["secret"] = secret
            self._put(frame)
        else:  # the hello was refused: try again with the new nick
            self.nick = nick
            if self._queue is not None:
                self._put(self._hello())

    def stop(self) -> None:
        self._stop.set()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._status(LinkState.CONNECTING if attempt == 0 else LinkState.RECONNECTING)
            detail = ""
            try:
                async with connect(
                    self.url,
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_timeout,
                    max_size=None,  # the server is trusted for size; history pages are big
                    compression=None,
                    open_timeout=10,
                    close_timeout=2,
                ) as ws:
                    if await self._session(ws):
                        attempt = 0
                    detail = _describe_close(ws)
                    if ws.close_code == CloseCode.REPLACED:
                        self._status(LinkState.OFFLINE, "this nick connected again elsewhere")
                        return
            except InvalidURI as exc:
                self._status(LinkState.OFFLINE, str(exc))
                return
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                detail = str(exc) or type(exc).__name__
            finally:
                self.welcomed = self.synced = False
                self._queue = None
            if self._stop.is_set():
                break
            delay = self.backoff.delay(attempt)
            attempt += 1
            self._status(LinkState.RECONNECTING, detail, time.monotonic() + delay)
            try:
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            except TimeoutError:
                pass
        self._status(LinkState.OFFLINE, "quit")

    async def _session(self, ws: ClientConnection) -> bool:
        """Serve one connection until it closes; True if it got as far as ``synced``."""
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        self._queue = queue
        self._put(self._hello())
        writer = asyncio.create_task(self._write(ws, queue))
        stopper = asyncio.create_task(self._stop.wait())
        reader = asyncio.create_task(self._read(ws))
        try:
            await asyncio.wait({reader, stopper, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, stopper, reader):
                task.cancel()
            await asyncio.gather(writer, stopper, reader, return_exceptions=True)
            if self._stop.is_set():
                await ws.close()
        return self.synced or self.welcomed

    async def _write(self, ws: ClientConnection, queue: asyncio.Queue[Frame]) -> None:
        while True:
            frame = await queue.get()
            text = json.dumps(frame, ensure_ascii=False)
            if self.trace:
                self.trace(">", text)
            await ws.send(text)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if self.trace:
                    self.trace("<", data if isinstance(data, str) else repr(data))
                try:
                    frame = json.loads(data)
                except ValueError:
                    continue
                if isinstance(frame, dict) and isinstance(frame.get("type"), str):
                    self._track(frame)
                    self.on_frame(frame)
        except ConnectionClosed:
            pass

    def _put(self, frame: Frame) -> None:
        if self._queue is not None:
            self._queue.put_nowait(frame)

    def _hello(self) -> Frame:
        hello: Frame = {"type": "hello", "nick": self.nick, "rooms": self.rooms}
        secret = self.secrets.get(self.url, self.nick)
        if secret:
            hello["secret"] = secret
        if self.last_id:
            hello["resume"] = self.last_id
        return hello

    def _track(self, frame: Frame) -> None:
        """Keep what a reconnect needs, before the UI sees the frame."""
        kind = frame["type"]
        if kind == "msg":
            self._seen(frame)
        elif kind == "history":
            for message in frame.get("messages", []):
                if isinstance(message, dict):
                    self._seen(message)
        elif kind == "ack":
            self.outbox.pop(str(frame.get("cid")), None)
        elif kind in ("welcome", "renamed"):
            self.nick = str(frame["nick"])
            self.welcomed = True
            if isinstance(frame.get("secret"), str):
                self.secrets.put(self.url, self.nick, frame["secret"])
        elif kind == "joined" and frame["room"] not in self.rooms:
            self.rooms.append(str(frame["room"]))
        elif kind == "synced":
            self.synced = True
            self._status(LinkState.CONNECTED)
            for pending in list(self.outbox.values()):
                self._put(pending)
        elif kind == "error" and frame.get("code") == "unavailable" and frame.get("cid"):
            asyncio.get_running_loop().call_later(2.0, self._resend, str(frame["cid"]))

    def _seen(self, message: Frame) -> None:
        msg_id = message.get("id")
        if isinstance(msg_id, int) and msg_id > self.last_id:
            self.last_id = msg_id
        # Our own message came back (perhaps in a replay after its ack was lost).
        if nick_key(str(message.get("from", ""))) == nick_key(self.nick):
            self.outbox.pop(str(message.get("cid")), None)

    def _resend(self, cid: str) -> None:
        if cid in self.outbox and self.synced:
            self._put(self.outbox[cid])

    def _status(self, state: LinkState, detail: str = "", retry_at: float | None = None) -> None:
        self.status = Status(state, detail, retry_at)
        self.on_status(self.status)


def _describe_close(ws: ClientConnection) -> str:
    if ws.close_code is None:
        return "connection lost"
    reason = f": {ws.close_reason}" if ws.close_reason else ""
    return f"closed by server ({ws.close_code}{reason})"
