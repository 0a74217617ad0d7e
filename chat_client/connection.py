"""The client's link to the server: connect, hello, resume, resend, reconnect.

It knows the protocol and nothing of screens: every frame from the server is handed to
``on_frame`` and every change of link state to ``on_status``. What it keeps is what a
reconnect needs: the nick, the rooms, the highest message id seen (with the ``epoch`` of
the history it belongs to), and an outbox of messages not yet acknowledged, which are
sent again (same ``cid``, so the server stores each once) until each is acknowledged,
refused for good, or cancelled by the user.

Nothing is stranded: frames leave paced under the server's announced ``rate`` and
``burst`` (a reconnect with a full outbox does not trip the rate limit), a ``rate_limited``
or ``unavailable`` send is retried after the server's ``retry_after`` (or a backoff), and
a message the server can never take (too long, not valid text) is refused here, before
it is queued, with the reason.

The reconnect loop is written here rather than taken from ``websockets.connect``'s
iterator because the user must see *when* the next try is, and because some outcomes
(4001: another client took this nick over; the nick is someone else's) must wait for the
user instead of being retried.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import json
import logging
import random
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from chat_client.secrets import NewUrl, SecretStore, SecretStoreError
from chat_protocol import CloseCode
from chat_protocol.limits import EPOCH_HEADER, MAX_BODY_CHARS, MAX_FRAME_BYTES, MAX_ROOMS
from chat_protocol.names import nick_key, normalize_room

log = logging.getLogger(__name__)

Frame = dict[str, Any]

#: Errors about a ``send`` after which trying again can succeed.
RETRYABLE = frozenset({"rate_limited", "unavailable", "internal"})
#: How often a send that failed with ``internal`` is tried before it is given up.
INTERNAL_ATTEMPTS = 3


class LinkState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the client stopped and waits for the user instead of reconnecting.

    ``code`` is ``nick_taken`` (registered to someone else), ``nick_in_use`` (yours, but
    connected elsewhere: take over?), ``nick_invalid``, ``secret_store`` (the secret
    cannot be kept, so the nick must not be claimed), ``new_url`` (the secret was never
    sent to this URL: is it the same server? :meth:`ChatConnection.trust_url`) or
    ``replaced`` (another client of this nick took over). ``during_session`` is True
    when it answers a ``/nick`` while connected: the session goes on under the old nick.
    """

    code: str
    nick: str
    message: str
    during_session: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    state: LinkState
    detail: str = ""  # in human words
    retry_at: float | None = None  # time.monotonic() of the next attempt
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: a retry waits uniform(first, cap) seconds."""

    first: float = 0.5
    factor: float = 2.0
    most: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(self.first, min(self.most, self.first * self.factor**attempt))


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server announced in ``welcome.limits`` (protocol defaults until then)."""

    max_body_chars: int = MAX_BODY_CHARS
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_rooms: int = MAX_ROOMS
    rate: float = 20.0
    burst: float = 40.0

    @classmethod
    def announced(cls, limits: Any) -> Limits:
        if not isinstance(limits, dict):
            return cls()

        def number(name: str, default: float) -> float:
            value = limits.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                return float(value)
            return default

        return cls(
            max_body_chars=int(number("max_body_chars", MAX_BODY_CHARS)),
            max_frame_bytes=int(number("max_frame_bytes", MAX_FRAME_BYTES)),
            max_rooms=int(number("max_rooms", MAX_ROOMS)),
            rate=number("rate", 20.0),
            burst=number("burst", 40.0),
        )


class Pacer:
    """The server's token bucket, mirrored: a frame leaves only when the server will take it.

    It keeps its tokens across reconnects (the server limits per nick and per address,
    not per connection), runs a little under the announced figures so that clock skew
    does not cost a refusal, and can be held back until a ``retry_after``.
    """

    MARGIN = 0.9

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()
        self._hold_until = 0.0
        self.configure(rate, burst)

    def configure(self, rate: float, burst: float) -> None:
        self._refill()
        self.rate = max(0.1, rate * self.MARGIN)
        self.burst = max(1.0, int(burst * self.MARGIN))
        self._tokens = min(self._tokens, self.burst)

    def hold(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the server said when it will take frames again)."""
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)
        self._tokens = 0.0

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self) -> float:
        self._refill()
        held = self._hold_until - time.monotonic()
        short = (1.0 - self._tokens) / self.rate if self._tokens < 1.0 else 0.0
        return max(held, short, 0.0)

    async def ready(self) -> None:
        # Sleeping is the point here: tokens come back with time, not with an event.
        while (delay := self.wait_time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)

    def take(self) -> None:
        self._refill()
        self._tokens -= 1.0


class MessageRefused(ValueError):
    """A message this client will not queue, because the server could never take it."""


class JoinRefused(ValueError):
    """A room this client will not ask for: the server would refuse it (too many rooms)."""


@dataclass
class _Outgoing:
    frame: Frame
    seq: int
    inflight: bool = False  # sent on this connection, not yet answered
    sent: bool = False  # ever sent, on any connection
    attempts: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


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
        takeover: bool = False,
        trust_url: bool = False,
    ) -> None:
        self.url = url
        #: Send any nick's secret through this URL even if it was never used with it
        #: (``--trust-url``; see :mod:`chat_client.secrets` for why it is asked).
        self.trust_all = trust_url
        #: Where this nick's secrets are filed: the database the server announces in the
        #: handshake (so one person's secret works through every URL of one server), or
        #: the URL for a server that announces none.
        self.server = url
        self.nick = nick
        self.rooms = list(rooms)
        self.secrets = secrets
        self.last_id = 0
        self.epoch: str | None = None
        self.limits = Limits()
        self.pacer = Pacer(self.limits.rate, self.limits.burst)
        self.on_frame = on_frame
        self.on_status = on_status
        self.trace = trace
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff = backoff
        #: Take the nick over from a live session of it on the next hello (``/nick`` and
        #: the first connection ask first; automatic reconnects do not).
        self.takeover = takeover
        self.status = Status(LinkState.OFFLINE)
        self.welcomed = False
        self.synced = False
        #: Sends refused for good (never to be resent): cid -> the server's reason.
        self.refused: dict[str, str] = {}
        #: Rooms given up because the server refused them (a ``join`` or the ``hello``),
        #: with the server's reason; the UI closes their windows and says why.
        self.dropped_rooms: dict[str, str] = {}
        #: The refs of requests sent on this connection and not answered yet (line mode
        #: waits for the answers before it exits: to print them, or to report a refusal).
        self.awaiting: set[str] = set()
        #: Rooms whose ``join`` the server rate-limited: asked again after ``retry_after``;
        #: messages to them wait for the ``joined`` (sent now they would be refused).
        self.rejoining: set[str] = set()
        self._refs = itertools.count(1)
        self._out: dict[str, _Outgoing] = {}
        self._jobs: list[tuple[int, str, Frame | None]] = []  # (seq, cid or "", request)
        self._wake = asyncio.Event()
        self._seq = itertools.count()
        self._proposed: set[str] = set()  # nick keys whose secret we proposed, unconfirmed
        self._refetch = False  # the history was reset: fetch it afresh once synced
        self._stop = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._waiting: Refusal | None = None  # set: do not reconnect until the user acts
        self._closing_for: Refusal | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._hello_frame: Frame | None = None
        self._next_nick: tuple[str, bool] | None = None  # /nick while offline: once synced

    # --- what the rest of the client calls -------------------------------------------------

    @property
    def outbox(self) -> dict[str, Frame]:
        """Messages not yet acknowledged, oldest first (cid -> the ``send`` frame)."""
        return {cid: out.frame for cid, out in self._out.items()}

    def is_pending(self, cid: str) -> bool:
        return cid in self._out

    def send_message(
        self, body: str, *, room: str | None = None, to: str | None = None, action: bool = False
    ) -> str:
        """Queue a message; it is (re)sent until acknowledged. Returns its cid.

        Raises :class:`MessageRefused` for a message the server could never take.
        """
        if not body.strip():
            raise MessageRefused("the message is empty")
        if not _encodable(body):
            raise MessageRefused("the message is not valid text (it holds invalid UTF-8)")
        if len(body) > self.limits.max_body_chars:
            raise MessageRefused(
                f"the message is {len(body):,} characters; the server takes at most "
                f"{self.limits.max_body_chars:,}: shorten it or split it"
            )
        cid = uuid.uuid4().hex
        frame: Frame = {"type": "send", "cid": cid, "body": body, "action": action}
        frame.update({"room": room} if room is not None else {"to": to})
        size = len(_encode(frame).encode())
        if size > self.limits.max_frame_bytes:
            raise MessageRefused(
                f"the message is {size:,} bytes as a frame; the server takes at most "
                f"{self.limits.max_frame_bytes:,}: shorten it or split it"
            )
        out = _Outgoing(frame, next(self._seq))
        self._out[cid] = out
        if self.synced:
            self._ready(cid)
        return cid

    def cancel(self, cid: str) -> bool | None:
        """Stop (re)sending a message. None: unknown; True: it was never sent, so it will
        not be stored; False: it was sent already (perhaps before a reconnect) and the
        server may have stored it."""
        out = self._out.pop(cid, None)
        if out is None:
            return None
        if out.timer is not None:
            out.timer.cancel()
        return not out.sent

    def request(self, frame: Frame) -> bool:
        """Send a request now; False when offline (requests are not queued). Its answer
        is awaited by its ``ref`` (one is given if it has none)."""
        if not self.synced:
            return False
        ref = frame.setdefault("ref", f"q{next(self._refs)}")
        self.awaiting.add(str(ref))
        self._push(frame)
        return True

    def is_parked(self, cid: str) -> bool:
        """Whether this message waits for its room's rate-limited ``join`` (a refusal
        that came for it meanwhile is not its fate: it is sent again once joined)."""
        out = self._out.get(cid)
        return out is not None and not out.inflight and out.frame.get("room") in self.rejoining

    @property
    def unanswered(self) -> bool:
        """Whether a request (or a rate-limited ``join``) still waits for its answer."""
        return bool(self.awaiting or self.rejoining)

    def join(self, room: str) -> None:
        """Be in ``room``: now if connected, else from the next ``hello``.

        Raises :class:`JoinRefused` past the server's room limit (``welcome.limits``
        ``max_rooms``, 32 until announced), online or offline: a ``hello`` asking for
        more rooms would be refused as a whole.
        """
        if room not in self.rooms:
            if len(self.rooms) >= self.limits.max_rooms:
                raise JoinRefused(
                    f"you are in {len(self.rooms)} rooms, the most the server allows: "
                    "/leave one first"
                )
            self.rooms.append(room)
        self.request({"type": "join", "room": room, "ref": f"join:{room}"})

    def _join_again(self, room: str) -> None:
        """A ``join`` the server rate-limited, asked again once allowed (offline, the
        next ``hello`` asks for the room anyway)."""
        if room not in self.rejoining:
            return
        frame: Frame = {"type": "join", "room": room, "ref": f"join:{room}"}
        if room not in self.rooms or not self.request(frame):
            self.rejoining.discard(room)  # left, or offline: the next hello asks for it

    def leave(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.remove(room)
        self.request({"type": "leave", "room": room})

    def change_nick(self, nick: str, *, takeover: bool = False) -> bool:
        """Ask for a nick. True: asked now, or in the next ``hello`` (no session under
        the current nick to keep); False: deferred until the link is back.

        A client that was connected and is now offline keeps its nick for the reconnect
        and asks for the new one once synced, after its unsent messages: those were
        typed, and are shown, under the current nick and are sent under it.

        Raises :class:`SecretStoreError` when a new nick's secret cannot be kept, and
        :class:`NewUrl` when the nick's secret was never sent to this URL (ask the
        person, then :meth:`trust_url`).
        """
        self._next_nick = None
        if self.welcomed:
            self._push(self._nick_frame(nick, takeover))
            return True
        if self.epoch is not None and not (
            self._waiting is not None
            and self._waiting.code in ("nick_taken", "nick_in_use", "nick_invalid", "new_url")
        ):
            self._next_nick = (nick, takeover)
            return False
        self.nick = nick
        self.takeover = takeover
        self.reconnect_now()
        return True

    def _nick_frame(self, nick: str, takeover: bool) -> Frame:
        frame: Frame = {"type": "nick", "nick": nick, "ref": f"nick:{nick}"}
        frame["secret"] = self._secret_for(nick)
        frame["takeover"] = takeover
        return frame

    def trust_url(self, nick: str) -> None:
        """The person says this URL is the server that holds ``nick``'s secret: send it
        there, now and from now on. Raises :class:`SecretStoreError`."""
        self.secrets.trust(self.server, nick, self.url)

    def reconnect_now(self) -> None:
        """Skip the backoff (or leave a wait for the user) and connect again now."""
        self._waiting = None
        self._retry_now.set()
        if self._ws is not None and self.welcomed:
            # A live session: close it; the loop reconnects at once.
            task = asyncio.ensure_future(self._ws.close(1000, "reconnect"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def stop(self) -> None:
        self._stop.set()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self._waiting is not None:
                await self._until(self._retry_now, None)
                self._retry_now.clear()
                attempt = 0
                continue
            self._status(LinkState.CONNECTING if attempt == 0 else LinkState.RECONNECTING)
            detail = ""
            floor = 0.0  # a wait the server asked for (HTTP 429 Retry-After)
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
                    self._ws = ws
                    self.server = server_identity(ws, self.url)
                    try:
                        hello = self._hello()
                    except SecretStoreError as exc:
                        self._closing_for = Refusal("secret_store", self.nick, str(exc))
                        await ws.close(1000, "the nick's secret cannot be kept")
                    except NewUrl as exc:  # nothing was sent: the server learns nothing
                        self._closing_for = Refusal("new_url", self.nick, str(exc))
                        await ws.close(1000, "not sure this is the nick's server")
                    else:
                        if await self._session(ws, hello):
                            attempt = 0
                    detail = describe_close(ws)
                    if ws.close_code == CloseCode.REPLACED:
                        reason = ws.close_reason or "this nick connected again elsewhere"
                        self.takeover = False  # taking it back is the user's call: ask
                        self._wait_for_user(Refusal("replaced", self.nick, reason))
                        continue
            except InvalidURI as exc:
                self._wait_for_user(Refusal("bad_url", self.nick, str(exc)))
                continue
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                detail = describe_failure(exc, self.url)
                floor = _retry_after(exc)
            finally:
                self._ws = None
                self.welcomed = self.synced = False
                self.awaiting.clear()
                self.rejoining.clear()
                self._jobs.clear()
                for out in self._out.values():
                    out.inflight = False
            if self._closing_for is not None:
                refusal, self._closing_for = self._closing_for, None
                self._wait_for_user(refusal)
                continue
            if self._stop.is_set():
                break
            if self._retry_now.is_set():
                self._retry_now.clear()
                attempt = 0
                continue
            delay = max(floor, self.backoff.delay(attempt))
            attempt += 1
            self._status(LinkState.RECONNECTING, detail, time.monotonic() + delay)
            await self._until(self._retry_now, delay)
            self._retry_now.clear()
        self._status(LinkState.OFFLINE, "quit")

    async def _until(self, event: asyncio.Event, seconds: float | None) -> None:
        """Wait for ``event``, ``stop()`` or ``seconds``, whichever comes first."""
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())}
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    def _wait_for_user(self, refusal: Refusal) -> None:
        self._waiting = refusal
        self._status(LinkState.OFFLINE, refusal.message, refusal=refusal)

    async def _session(self, ws: ClientConnection, hello: Frame) -> bool:
        """Serve one connection until it closes; True if it got as far as ``welcome``."""
        await self._send(ws, hello)
        writer = asyncio.create_task(self._write(ws))
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

    async def _send(self, ws: ClientConnection, frame: Frame) -> None:
        text = _encode(frame)
        if self.trace:
            self.trace(">", masked(text))
        await ws.send(text)

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            await self.pacer.ready()
            frame = await self._next_job()
            if frame is None:
                continue
            self.pacer.take()
            await self._send(ws, frame)

    async def _next_job(self) -> Frame | None:
        """The oldest job that is ready: requests and sends in the order they were made."""
        while not self._jobs:
            self._wake.clear()
            await self._wake.wait()
        _, cid, request = heapq.heappop(self._jobs)
        if request is not None:
            return request
        out = self._out.get(cid)
        if out is None or out.inflight:  # acknowledged, cancelled or already on its way
            return None
        out.inflight = out.sent = True
        return out.frame

    def _push(self, request: Frame) -> None:
        heapq.heappush(self._jobs, (next(self._seq), "", request))
        self._wake.set()

    def _ready(self, cid: str) -> None:
        out = self._out.get(cid)
        if out is None or not self.synced or out.frame.get("room") in self.rejoining:
            return
        out.timer = None
        heapq.heappush(self._jobs, (out.seq, cid, None))
        self._wake.set()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if self.trace:
                    self.trace("<", masked(data) if isinstance(data, str) else repr(data))
                try:
                    frame = json.loads(data)
                except ValueError:
                    continue
                if isinstance(frame, dict) and isinstance(frame.get("type"), str):
                    self._track(frame)
                    self.on_frame(frame)
                    if self._closing_for is not None:
                        await ws.close(1000, "nick refused")
                        return
        except ConnectionClosed:
            pass

    def _secret_for(self, nick: str) -> str:
        """The nick's secret; for a nick we hold none of, a new one, stored before use.

        Raises :class:`NewUrl` for a secret filed under an epoch that was never sent
        through this URL: the epoch is public, so a look-alike server at another URL can
        announce it to collect secrets (see :mod:`chat_client.secrets`).
        """
        secret = self.secrets.get(self.server, nick)
        if self.server == self.url:  # no epoch announced: filed by this very URL
            if secret is None:
                secret = self.secrets.propose(self.server, nick, self.url)
                self._proposed.add(nick_key(nick))
            return secret
        by_url = self.secrets.get(self.url, nick)  # filed by this URL by an older client
        if secret is None and by_url is not None:
            self.secrets.trust(self.server, nick, self.url)
            self.secrets.put(self.server, nick, by_url)  # filed by the server from now on
            return by_url
        if secret is None:
            secret = self.secrets.propose(self.server, nick, self.url)
            self._proposed.add(nick_key(nick))
            return secret
        if by_url == secret or self.trust_all:
            self.secrets.trust(self.server, nick, self.url)
        elif not self.secrets.trusted(self.server, nick, self.url):
            raise NewUrl(nick, self.url, self.secrets.urls(self.server, nick))
        return secret

    def _hello(self) -> Frame:
        hello: Frame = {"type": "hello", "nick": self.nick, "rooms": self.rooms, "ref": "hello"}
        hello["secret"] = self._secret_for(self.nick)
        hello["takeover"] = self.takeover
        if self.last_id:
            hello["resume"] = self.last_id
        self._hello_frame = hello
        return hello

    def _track(self, frame: Frame) -> None:
        """Keep what a reconnect needs, before the UI sees the frame."""
        kind = frame["type"]
        ref = frame.get("ref")
        if isinstance(ref, str):
            self.awaiting.discard(ref)
        if kind == "msg":
            self._seen(frame)
        elif kind == "history":
            for message in frame.get("messages", []):
                if isinstance(message, dict):
                    self._seen(message)
        elif kind == "ack":
            self._done(str(frame.get("cid")))
        elif kind == "welcome":
            self._welcome(frame)
        elif kind == "renamed":
            self._renamed(frame)
        elif kind == "joined":
            room = str(frame["room"])
            if room not in self.rooms:
                self.rooms.append(room)
            if room in self.rejoining:
                self.rejoining.discard(room)
                for cid, out in self._out.items():
                    if out.frame.get("room") == room and not out.inflight:
                        self._ready(cid)
        elif kind == "synced":
            self.synced = True
            self._status(LinkState.CONNECTED)
            if self._refetch:
                self._refetch = False
                for room in self.rooms:
                    self._push({"type": "history", "room": room})
                self._push({"type": "history", "direct": True})
            for cid in self._out:
                self._ready(cid)
            if self._next_nick is not None:  # asked for while offline: after the resends
                nick, takeover = self._next_nick
                self._next_nick = None
                try:
                    self._push(self._nick_frame(nick, takeover))
                except SecretStoreError as exc:
                    refusal = Refusal("secret_store", nick, str(exc), during_session=True)
                    self._status(self.status.state, self.status.detail, refusal=refusal)
                except NewUrl as exc:
                    refusal = Refusal("new_url", nick, str(exc), during_session=True)
                    self._status(self.status.state, self.status.detail, refusal=refusal)
        elif kind == "error":
            self._error(frame)

    def _welcome(self, frame: Frame) -> None:
        self.nick = str(frame["nick"])
        self.welcomed = True
        self.takeover = True  # from now on, reconnects take our own session back
        self.limits = Limits.announced(frame.get("limits"))
        self.pacer.configure(self.limits.rate, self.limits.burst)
        epoch = frame.get("epoch")
        if isinstance(epoch, str):
            if self.epoch is not None and epoch != self.epoch:
                # A new database: our resume point means nothing there.
                self.last_id = 0
                self._refetch = True
            self.epoch = epoch
        self._confirm(self.nick, frame.get("secret"))

    def _renamed(self, frame: Frame) -> None:
        self.nick = str(frame["nick"])
        self._confirm(self.nick, frame.get("secret"))

    def _confirm(self, nick: str, secret: Any) -> None:
        """The server accepted this nick: keep the secret it gave, or the one we proposed."""
        self._proposed.discard(nick_key(nick))
        if isinstance(secret, str):
            try:
                self.secrets.trust(self.server, nick, self.url)
                self.secrets.put(self.server, nick, secret)
            except SecretStoreError as exc:
                log.error("%s", exc)

    def _error(self, frame: Frame) -> None:
        code = str(frame.get("code"))
        ref = frame.get("ref")
        cid = frame.get("cid")
        retry_after = frame.get("retry_after")
        message = str(frame.get("message", code))
        if isinstance(ref, str) and ref.startswith("join:") and code == "rate_limited":
            wait = retry_after if isinstance(retry_after, int | float) else 1.0
            self.rejoining.add(ref[5:])
            asyncio.get_running_loop().call_later(float(wait), self._join_again, ref[5:])
        elif isinstance(ref, str) and ref.startswith("join:"):
            room = ref[5:]  # refused for good: we are not in it (nor in the next hello)
            self.rejoining.discard(room)
            if room in self.rooms:
                self.rooms.remove(room)
            self.dropped_rooms[room] = message
            return
        if ref == "hello" and not self.welcomed and self._room_refusal(code, message):
            return
        if code == "rate_limited":
            wait = retry_after if isinstance(retry_after, int | float) else 1.0
            self.pacer.hold(float(wait))
            if not self.welcomed and self._hello_frame is not None:
                self._push(self._hello_frame)  # the hello itself: again, when allowed
                return
        if code in ("nick_taken", "nick_in_use", "nick_invalid"):
            during = isinstance(ref, str) and ref.startswith("nick:")
            nick = ref[5:] if during and isinstance(ref, str) else self.nick
            if code == "nick_taken" and nick_key(nick) in self._proposed:
                # We proposed a secret for a nick that turned out to be someone else's.
                self.secrets.discard(self.server, nick)
                self._proposed.discard(nick_key(nick))
            refusal = Refusal(code, nick, str(frame.get("message", code)), during)
            if during:
                self._status(self.status.state, self.status.detail, refusal=refusal)
            elif not self.welcomed:
                self._closing_for = refusal
            return
        if not isinstance(cid, str) or cid not in self._out:
            return
        out = self._out[cid]
        out.inflight = False
        if code == "not_in_room" and out.frame.get("room") in self.rejoining:
            return  # sent before the join's refusal came: again once joined
        out.attempts += 1
        if code == "rate_limited":
            self._ready(cid)  # the pacer holds it back until retry_after
        elif code in RETRYABLE and (code != "internal" or out.attempts < INTERNAL_ATTEMPTS):
            delay = self.backoff.delay(out.attempts)
            out.timer = asyncio.get_running_loop().call_later(delay, self._ready, cid)
        else:
            self._done(cid)
            self.refused[cid] = str(frame.get("message", code))

    def _room_refusal(self, code: str, message: str) -> bool:
        """The ``hello`` was refused for its rooms: drop the offending ones and say hello
        again on this connection (the server allows that), instead of waiting for the
        server to close us for "no hello in time" and asking for the same rooms forever.
        """
        if code == "too_many_rooms":
            keep = self.limits.max_rooms
            if len(self.rooms) <= keep:  # the server's limit is lower than we thought
                keep = max(1, len(self.rooms) // 2)
            drop = self.rooms[keep:]
        elif code in ("room_invalid", "bad_frame"):
            drop = [room for room in self.rooms if normalize_room(room) != room]
        else:
            return False
        if not drop:
            self._closing_for = Refusal(code, self.nick, message)
            return True
        for room in drop:
            self.rooms.remove(room)
            self.dropped_rooms[room] = message
        self._push(self._hello())
        return True

    def _done(self, cid: str) -> None:
        out = self._out.pop(cid, None)
        if out is not None and out.timer is not None:
            out.timer.cancel()

    def _seen(self, message: Frame) -> None:
        msg_id = message.get("id")
        if isinstance(msg_id, int) and msg_id > self.last_id:
            self.last_id = msg_id
        # Our own message came back (perhaps in a replay after its ack was lost).
        if nick_key(str(message.get("from", ""))) == nick_key(self.nick):
            self._done(str(message.get("cid")))

    def _status(
        self,
        state: LinkState,
        detail: str = "",
        retry_at: float | None = None,
        refusal: Refusal | None = None,
    ) -> None:
        self.status = Status(state, detail, retry_at, refusal)
        self.on_status(self.status)


# A "secret" member of a frame (a key follows "{" or ","; inside a string a quote is
# escaped, so a body that mentions "secret" is never matched).
_SECRET = re.compile(r'([{,]\s*"secret"\s*:\s*)"[^"\\]*"')


def masked(text: str) -> str:
    """A frame's text for --trace: a nick's secret is as good as the nick, so hide it."""
    return _SECRET.sub(r'\1"***"', text)


def _encode(frame: Frame) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_EPOCH = re.compile(r"[0-9A-Za-z_-]{1,64}")


def server_identity(ws: ClientConnection, url: str) -> str:
    """Which server this is, for filing secrets: its database's epoch, else its URL."""
    response = ws.response
    epoch = response.headers.get(EPOCH_HEADER, "") if response is not None else ""
    return f"epoch-{epoch}" if _EPOCH.fullmatch(epoch) else url


# --- failures in human words ----------------------------------------------------------------

_CLOSES = {
    1000: "the server closed the connection",
    1001: "the server is restarting or shutting down",
    1006: "the connection was lost",
    1009: "the server refused a frame as too big",
    1011: "the server stopped answering",
}


def describe_close(ws: ClientConnection) -> str:
    """Why a connection that was open has ended, for a person."""
    code, reason = ws.close_code, ws.close_reason
    if code is None or code == 1006:
        return "the connection was lost"
    if code == 1011 and "keepalive" in (reason or ""):
        return "the server stopped answering (no reply to keepalive pings)"
    if code == CloseCode.POLICY:
        return f"the server closed the connection: {reason or 'policy'}"
    words = _CLOSES.get(code, f"the server closed the connection (code {code})")
    return f"{words}: {reason}" if reason and code not in (1000, 1001) else words


def _retry_after(exc: BaseException) -> float:
    """The seconds a 429 answer asked us to wait (0 if it did not say)."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code == 429:
        value = exc.response.headers.get("Retry-After", "")
        if value.isdigit():
            return min(float(value), 300.0)
    return 0.0


def describe_failure(exc: BaseException, url: str) -> str:
    """Why connecting failed, for a person: never ``[Errno -2] Name or service not known``."""
    parts = urlsplit(url)
    host = parts.hostname or url
    where = f"{host}:{parts.port}" if parts.port else host
    if isinstance(exc, socket.gaierror):
        return f"cannot find the server {host!r} (the name does not resolve)"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing answers at {where} (is the server running?)"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} (timed out)"
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status == 429:
            return "the server refused: too many connections from this address"
        return f"the server refused the connection (HTTP {status})"
    if isinstance(exc, InvalidHandshake):
        return f"{where} is not a chat server ({exc})"
    if isinstance(exc, ConnectionClosed):
        return "the connection was lost while connecting"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"{host} is unreachable (no route to it)"
        if exc.errno == errno.ECONNRESET:
            return "the connection was reset"
        return f"cannot reach {where} ({exc.strerror or exc})"
    return str(exc) or type(exc).__name__
