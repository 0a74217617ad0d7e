"""One client connection: the protocol state machine from ``hello`` to close.

The session reads frames one at a time and answers each before reading the next, so its
own replies keep the order of the requests. Messages go to the store's writer queue and
are acknowledged by the server when their batch commits, not here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from chat_protocol import PROTOCOL_VERSION, CloseCode, ErrorCode, ProtocolError, decode, encode
from chat_protocol.frames import (
    ClientFrame,
    Frame,
    Hello,
    History,
    Join,
    Leave,
    Nick,
    Rooms,
    Send,
    Who,
    parse_client_frame,
    ref_of,
)
from chat_protocol.limits import HISTORY_DEFAULT, MAX_ROOMS
from chat_protocol.names import nick_key
from chat_server import metrics
from chat_server.config import ServerConfig
from chat_server.fanout import Held, Hub, write_frames
from chat_server.messages import Draft, StoredMessage, channel_of
from chat_server.ratelimit import TokenBucket
from chat_server.store import StoreUnavailable

if TYPE_CHECKING:
    from chat_server.backends.base import ChatStore
    from chat_server.cluster import Cluster

log = logging.getLogger(__name__)

#: Decides whether a held message was already sent by the catch-up that held it.
Covered = Callable[[StoredMessage], bool]


@dataclass
class Context:
    """What every session shares: settings, the store, the hub, background closes."""

    config: ServerConfig
    store: ChatStore
    hub: Hub
    limits: dict[str, Any]
    closing: set[asyncio.Task[None]] = field(default_factory=set)
    #: Set when this server is one replica of a cluster (a PostgreSQL store).
    cluster: Cluster | None = None

    def close_later(self, connection: ServerConnection, code: int, reason: str) -> None:
        task = asyncio.create_task(connection.close(code, reason))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)


class Session:
    # Slots: an idle connection's memory is mostly this object and the websocket's.
    __slots__ = (
        "address",
        "bucket",
        "close_code",
        "closed_reason",
        "connection",
        "ctx",
        "hold",
        "nick",
        "nick_key",
        "strikes",
    )

    def __init__(self, ctx: Context, connection: ServerConnection, address: str = "") -> None:
        self.ctx = ctx
        self.connection = connection
        #: The client's IP address (behind a trusted proxy: from X-Forwarded-For).
        self.address = address
        self.nick = ""
        self.nick_key = ""
        self.hold: list[Held] | None = None
        self.bucket = TokenBucket(ctx.config.rate, ctx.config.burst)
        self.strikes = 0
        self.closed_reason: str | None = None
        self.close_code = 1000

    @property
    def rooms(self) -> list[str]:
        return self.ctx.hub.rooms_of(self)

    # --- writing -----------------------------------------------------------------------

    def write(self, frame: Frame) -> None:
        """Write a frame now, past any hold: replies and the catch-up itself."""
        write_frames(self.connection, [encode(frame)])
        self.ctx.hub.check(self)

    def deliver(self, frame: Frame) -> None:
        """Write a frame in turn with live traffic: held while a catch-up runs."""
        self.ctx.hub.publish([self], encode(frame))

    def error(self, code: ErrorCode, message: str, ref: str | None = None, **extra: Any) -> None:
        metrics.ERRORS.labels(code.value).inc()
        frame: Frame = {"type": "error", "code": code.value, "message": message}
        if ref is not None:
            frame["ref"] = ref
        frame.update(extra)
        self.deliver(frame)

    def kick(self, code: int, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason, self.close_code = reason, code
            log.warning("closing %s (%s): %s", self.nick or "?", self.remote, reason)
        self.ctx.close_later(self.connection, code, reason)

    @property
    def remote(self) -> str:
        address = self.connection.remote_address
        peer = f"{address[0]}:{address[1]}" if address else "?"
        if address and self.address and self.address != str(address[0]):
            return f"{self.address} via {peer}"
        return peer

    # --- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        """Read and answer frames until the connection closes.

        One flat loop, not a chain of helpers: every coroutine frame here is memory that
        each idle connection holds for as long as it is open.
        """
        request = self.connection.request
        agent = request.headers.get("User-Agent", "?") if request is not None else "?"
        log.info("connection from %s (%s)", self.remote, agent)
        # The handshake's HTTP headers are not used after this point; holding them costs
        # about 2 KiB per connection for as long as it stays open.
        for handshake in (request, self.connection.response):
            if handshake is not None:
                handshake.headers.clear()
        # A timer, not asyncio.timeout(): nothing of it stays alive once hello is done.
        hello_timer = asyncio.get_running_loop().call_later(
            self.ctx.config.hello_timeout, self.kick, CloseCode.POLICY, "no hello in time"
        )
        try:
            async for data in self.connection:
                parsed = self._parse(data)
                if parsed is None:
                    if self.closed_reason is not None:
                        break
                    continue
                frame, ref = parsed
                if not self.nick_key:
                    if not isinstance(frame, Hello):
                        self.error(ErrorCode.HELLO_FIRST, "the first frame must be hello", ref)
                    elif await self._hello(frame, ref):
                        hello_timer.cancel()
                elif isinstance(frame, Hello):
                    self.error(ErrorCode.ALREADY_HELLO, "hello was already accepted", ref)
                else:
                    try:
                        await _HANDLERS[type(frame)](self, frame, ref)
                    except StoreUnavailable as exc:
                        message = f"the database is unavailable: {exc}"
                        self.error(ErrorCode.UNAVAILABLE, message, ref)
        except ConnectionClosed:
            pass
        finally:
            hello_timer.cancel()
            self._depart()
            if self.closed_reason is not None:
                # Close here too: returning first would let websockets close with 1000.
                await self.connection.close(self.close_code, self.closed_reason)
            log.info(
                "%s (%s) disconnected: code %s %s",
                self.nick or "?",
                self.remote,
                self.connection.close_code,
                self.closed_reason or self.connection.close_reason or "",
            )

    def _parse(self, data: str | bytes) -> tuple[ClientFrame, str | None] | None:
        """A frame parsed, after rate limiting; None (answered or kicked) if refused."""
        if not self.bucket.take():
            self.strikes += 1
            if self.strikes >= self.ctx.config.flood_strikes:
                self.kick(CloseCode.POLICY, "flooding: too many frames over the rate limit")
            else:
                self.error(ErrorCode.RATE_LIMITED, "too many frames; slow down")
            return None
        self.strikes = 0
        raw: Frame | None = None
        try:
            raw = decode(data)
            return parse_client_frame(raw), ref_of(raw)
        except ProtocolError as exc:
            self.error(exc.code, exc.message, ref_of(raw) if raw else None)
            return None

    def _depart(self) -> None:
        hub = self.ctx.hub
        if not self.nick_key or hub.online.get(self.nick_key) is not self:
            return
        if self.ctx.cluster is not None:
            self.ctx.cluster.offline(self)
        rooms = hub.remove(self)
        for room in rooms:
            self._presence(room, {"event": "leave", "room": room, "nick": self.nick})

    def _presence(self, room: str, event: Frame) -> None:
        """Tell a room's other members that something happened to this session."""
        if self.ctx.cluster is not None:
            return  # the cluster derives presence from the database's ordered events
        others = [m for m in self.ctx.hub.room_members(room) if m is not self]
        self.ctx.hub.publish(others, encode({"type": "presence", **event}))

    # --- claiming a nick -------------------------------------------------------------------

    async def _claim(
        self, nick: str, secret: str | None, ref: str | None
    ) -> tuple[str, str | None] | None:
        """Claim a nick; on success (registered spelling, new secret or None)."""
        key = nick_key(nick)
        try:
            claim = await self.ctx.store.claim_nick(nick, key, secret)
        except StoreUnavailable as exc:
            self.error(ErrorCode.UNAVAILABLE, f"the database is unavailable: {exc}", ref)
            return None
        if not claim.granted:
            self.error(
                ErrorCode.NICK_TAKEN,
                f"the nick {claim.nick!r} is registered; claiming it needs its secret",
                ref,
            )
            return None
        holder = self.ctx.hub.online.get(key)
        if holder is not None and holder is not self:
            # The secret proves it is the same person: the newer connection wins.
            holder.kick(CloseCode.REPLACED, "replaced: this nick connected again elsewhere")
            self.ctx.hub.remove(holder)
        return claim.nick, claim.new_secret

    async def _hello(self, hello: Hello, ref: str | None) -> bool:
        claimed = await self._claim(hello.nick, hello.secret, ref)
        if claimed is None or not await self._go_online(claimed[0], hello.rooms, ref):
            return False
        self.nick, secret = claimed
        self.nick_key = nick_key(self.nick)
        await self.ctx.store.ensure_rooms(hello.rooms)
        hub = self.ctx.hub
        self.hold = []
        hub.add(self)
        for room in hello.rooms:
            hub.join(self, room)
        welcome: Frame = {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "nick": self.nick,
            "limits": self.ctx.limits,
        }
        if secret is not None:
            welcome["secret"] = secret
        if ref is not None:
            welcome["ref"] = ref
        self.write(welcome)
        for room in hello.rooms:
            self.write({"type": "joined", "room": room, "members": hub.members(room)})
            self._presence(room, {"event": "join", "room": room, "nick": self.nick})
        log.info("%s (%s) joined %s", self.nick, self.remote, ", ".join(hello.rooms))
        covered: Covered = _nothing
        try:
            if hello.resume is not None:
                covered = await self._replay(hello.resume, hello.rooms)
            else:
                covered = await self._recent(hello.rooms, hello.history)
            await self._caught_up()
            self.write({"type": "synced"})
        finally:
            self._release(covered)
        return True

    async def _go_online(self, nick: str, rooms: Sequence[str], ref: str | None) -> bool:
        """In a cluster: become the nick's one live session everywhere (else: no-op)."""
        if self.ctx.cluster is None:
            return True
        try:
            await self.ctx.cluster.online(self, nick, nick_key(nick), rooms, self.address)
        except StoreUnavailable as exc:
            self.error(ErrorCode.UNAVAILABLE, f"the database is unavailable: {exc}", ref)
            return False
        return True

    async def _caught_up(self) -> None:
        """In a cluster: before a hold ends, let the live stream pass what the catch-up read.

        If that cannot be known the session is closed (the client resumes elsewhere)
        rather than risk showing a message twice.
        """
        cluster = self.ctx.cluster
        if cluster is not None and not await cluster.caught_up():
            self.kick(1011, "the live message stream is unavailable: reconnect")

    async def _replay(self, after: int, rooms: Sequence[str]) -> Covered:
        messages, truncated = await self.ctx.store.replay(
            after, rooms, self.nick_key, self.ctx.config.resume_cap
        )
        if truncated:
            metrics.RESUME_GAPS.inc()
            self.write({"type": "gap", "after": after, "before": messages[0].id})
        for message in messages:
            self.write(message.frame())
        high = max(after, messages[-1].id if messages else 0)
        return lambda message: message.id <= high

    async def _recent(self, rooms: Sequence[str], limit: int) -> Covered:
        newest: dict[str, int] = {}
        store = self.ctx.store
        if limit == 0:
            return _nothing
        for room in rooms:
            messages, more = await store.room_history(room, None, limit)
            history = {"type": "history", "room": room, "messages": _frames(messages)}
            self.write({**history, "more": more})
            newest[channel_of(room, "", None)] = messages[-1].id if messages else 0
        dms, more = await store.recent_dms(self.nick_key, limit)
        self.write({"type": "history", "direct": True, "messages": _frames(dms), "more": more})
        newest_dm = dms[-1].id if dms else 0

        def covered(message: StoredMessage) -> bool:
            if message.room is None:
                return message.id <= newest_dm
            channel = channel_of(message.room, "", None)
            return message.id <= newest.get(channel, 0)

        return covered

    def _release(self, covered: Covered) -> None:
        """End a hold: write what live traffic came in, minus what the catch-up sent."""
        if self.closed_reason is not None:
            return  # closing: keep holding, write nothing more
        held, self.hold = self.hold or [], None
        data = [frame for frame, message in held if message is None or not covered(message)]
        if data:
            write_frames(self.connection, data)
        self.ctx.hub.check(self)

    # --- requests --------------------------------------------------------------------------

    async def _send(self, send: Send, ref: str | None) -> None:
        recipient_key = recipient = None
        if send.room is not None:
            if not self.ctx.hub.is_member(self, send.room):
                message = f"join #{send.room} before sending to it"
                self.error(ErrorCode.NOT_IN_ROOM, message, ref, cid=send.cid)
                return
        else:
            assert send.to is not None
            recipient_key = nick_key(send.to)
            online = self.ctx.hub.online.get(recipient_key)
            if online is not None:
                recipient = online.nick
            else:
                recipient = await self.ctx.store.registered_nick(recipient_key)
            if recipient is None:
                message = f"nobody has the nick {send.to!r}"
                self.error(ErrorCode.NO_SUCH_NICK, message, ref, cid=send.cid)
                return
        await self.ctx.store.submit(
            Draft(
                sender_key=self.nick_key,
                sender=self.nick,
                room=send.room,
                recipient_key=recipient_key,
                recipient=recipient,
                action=send.action,
                body=send.body,
                cid=send.cid,
                origin=self,
            )
        )

    async def _join(self, join: Join, ref: str | None) -> None:
        hub = self.ctx.hub
        already = hub.is_member(self, join.room)
        if not already and len(self.rooms) >= MAX_ROOMS:
            self.error(ErrorCode.TOO_MANY_ROOMS, f"at most {MAX_ROOMS} rooms at once", ref)
            return
        await self.ctx.store.ensure_rooms([join.room])
        if self.ctx.cluster is not None and not already:
            await self.ctx.cluster.room(self, join.room, joined=True)
        self.hold = []
        covered: Covered = _nothing
        try:
            hub.join(self, join.room)
            joined = {"type": "joined", "room": join.room, "members": hub.members(join.room)}
            self.write(_with_ref(joined, ref))
            if not already:
                self._presence(join.room, {"event": "join", "room": join.room, "nick": self.nick})
            messages, more = await self.ctx.store.room_history(join.room, None, HISTORY_DEFAULT)
            history = {"type": "history", "room": join.room, "messages": _frames(messages)}
            self.write({**history, "more": more})
            newest = messages[-1].id if messages else 0
            covered = lambda m: m.room == join.room and m.id <= newest  # noqa: E731
            await self._caught_up()
        finally:
            self._release(covered)

    async def _leave(self, leave: Leave, ref: str | None) -> None:
        hub = self.ctx.hub
        if not hub.is_member(self, leave.room):
            self.error(ErrorCode.NOT_IN_ROOM, f"you are not in #{leave.room}", ref)
            return
        if self.ctx.cluster is not None:
            await self.ctx.cluster.room(self, leave.room, joined=False)
        hub.leave(self, leave.room)
        self.deliver(_with_ref({"type": "left", "room": leave.room}, ref))
        self._presence(leave.room, {"event": "leave", "room": leave.room, "nick": self.nick})

    async def _nick(self, request: Nick, ref: str | None) -> None:
        old, old_key = self.nick, self.nick_key
        claimed = await self._claim(request.nick, request.secret, ref)
        if claimed is None or not await self._go_online(claimed[0], self.rooms, ref):
            return
        hub = self.ctx.hub
        rooms = self.rooms
        hub.remove(self)
        self.nick, secret = claimed
        self.nick_key = nick_key(self.nick)
        hub.add(self)
        for room in rooms:
            hub.join(self, room)
        reply: Frame = {"type": "renamed", "old": old, "nick": self.nick}
        if secret is not None:
            reply["secret"] = secret
        self.deliver(_with_ref(reply, ref))
        if old_key != self.nick_key or old != self.nick:
            for room in rooms:
                event = {"event": "rename", "room": room, "old": old, "nick": self.nick}
                self._presence(room, event)
        log.info("%s (%s) is now %s", old, self.remote, self.nick)

    async def _who(self, who: Who, ref: str | None) -> None:
        hub = self.ctx.hub
        if who.room is None:
            nicks = hub.online_nicks()
            self.deliver(_with_ref({"type": "members", "nicks": nicks}, ref))
        else:
            nicks = hub.members(who.room)
            self.deliver(_with_ref({"type": "members", "room": who.room, "nicks": nicks}, ref))

    async def _rooms(self, _: Rooms, ref: str | None) -> None:
        counts = self.ctx.hub.member_counts()
        names = sorted(set(await self.ctx.store.room_names()) | set(counts))
        rooms = [{"name": name, "members": counts.get(name, 0)} for name in names]
        self.deliver(_with_ref({"type": "rooms", "rooms": rooms}, ref))

    async def _history(self, request: History, ref: str | None) -> None:
        store = self.ctx.store
        reply: Frame = {"type": "history"}
        if request.room is not None:
            messages, more = await store.room_history(request.room, request.before, request.limit)
            reply["room"] = request.room
        else:
            assert request.with_nick is not None
            other = nick_key(request.with_nick)
            messages, more = await store.dm_history(
                self.nick_key, other, request.before, request.limit
            )
            reply["with"] = request.with_nick
        reply["messages"] = _frames(messages)
        reply["more"] = more
        self.deliver(_with_ref(reply, ref))


#: Request type -> handler, shared by all sessions rather than bound per connection.
_HANDLERS: dict[type, Callable[[Session, Any, str | None], Awaitable[None]]] = {
    Send: Session._send,
    Join: Session._join,
    Leave: Session._leave,
    Nick: Session._nick,
    Who: Session._who,
    Rooms: Session._rooms,
    History: Session._history,
}


def _nothing(message: StoredMessage) -> bool:
    return False


def _frames(messages: Sequence[StoredMessage]) -> list[Frame]:
    return [message.frame() for message in messages]


def _with_ref(frame: Frame, ref: str | None) -> Frame:
    if ref is not None:
        frame["ref"] = ref
    return frame
