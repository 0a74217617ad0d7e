"""One client connection: the protocol from ``hello`` to close, and nothing of sockets.

Frames come in through :meth:`Session.received`, called by the connection layer
(``connections.py``) from the socket's ``data_received``, and every answer goes out
through the session's :class:`~chat_server.connections.Link`.

**Order.** Every frame gets a place in the session's reply queue when it arrives, and
replies leave in that order, whatever finishes first. A refused frame (bad JSON, over a
rate limit, …) is answered at once, in its place. Requests run one at a time in a worker
task that exists only while requests are waiting, so an idle connection holds no task. A
``send`` only queues its message for the store and lets the next request run, so that
consecutive sends share a group commit; its place is filled by the ``ack`` (or error)
when the batch commits. Any other request first waits until everything before it has
been answered: a ``history`` after a ``send`` therefore contains that message.

**Failure costs one request.** A refusal is a documented ``error``; the database refusing
is ``unavailable``; anything else (a bug) is logged with its traceback and answered
``internal``, and the session goes on. A failure in a catch-up that has already sent
``welcome`` closes the connection with 1011 instead, since the client's view is then
incomplete; the client reconnects with ``resume``.

**Catch-ups** (the ``hello`` history or replay, ``join``, ``history``) are read from the
store page by page under a server-wide cap on concurrent reads, cut to byte budgets, and
written only as fast as the client reads them. Live traffic for the session is held
meanwhile (see ``fanout.py``). When the client goes, its pending work is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from heapq import merge
from typing import TYPE_CHECKING, Any

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
    cid_of,
    parse_client_frame,
    ref_of,
)
from chat_protocol.limits import HISTORY_DEFAULT, MAX_ROOMS, MEMBERS_MAX
from chat_protocol.names import nick_key
from chat_server import metrics
from chat_server.backends.base import ChatStore, ClaimStatus, NickClaim, StoreUnavailable
from chat_server.config import ServerConfig
from chat_server.connections import Link
from chat_server.encoding import ack_frame, msg_frame
from chat_server.fanout import Delivered, Hold, Hub, Member
from chat_server.messages import Draft, EncodedFrames, Scope, StoredMessage
from chat_server.presence import Presence
from chat_server.ratelimit import Limit, Quotas, TokenBucket
from chat_server.recent import RecentRooms
from chat_server.throttle import LogThrottle

if TYPE_CHECKING:
    from chat_server.cluster import Cluster

log = logging.getLogger(__name__)

#: Decides whether a held message was already sent by the catch-up that held it.
Covered = Callable[[StoredMessage], bool]

#: Reply places waiting before the session stops reading more frames, and resumes.
BACKLOG_HIGH = 256
BACKLOG_LOW = 64
#: A flooding connection is closed once every frame read before is answered; this long
#: at most, if an answer waits for a database that does not answer.
FLOOD_CLOSE_WITHIN = 15.0
#: A replay smaller than this is kept from its first read instead of being read twice.
REPLAY_KEEP_BYTES = 64 * 1024
#: About how many bytes of a catch-up go to the socket in one write (a resume of 50 short
#: messages is one write, not four: in a reconnect storm the writes were 8 % of the CPU).
PACE_BYTES = 16 * 1024


@dataclass
class Context:
    """What every session shares."""

    config: ServerConfig
    store: ChatStore
    hub: Hub
    presence: Presence
    quotas: Quotas
    limits: dict[str, Any]
    #: Set when this server is one replica of a cluster (a PostgreSQL store).
    cluster: Cluster | None = None
    #: Catch-up reads (with their encoding) running at once, server-wide.
    catchups: asyncio.Semaphore = field(init=False)
    #: Recent messages' ``msg`` frames, encoded once for every client that needs them.
    encoded: EncodedFrames = field(default_factory=EncodedFrames)
    #: Each room's newest messages, for replays without SQL (one server only: None in a
    #: cluster).
    recent: RecentRooms | None = None
    #: How far this server's fan-out has delivered (a single server; a cluster has its
    #: own, ``Cluster.caught_up``).
    delivered: Delivered = field(default_factory=Delivered)
    #: What clients can make the server log over and over (kicks, failing requests) is
    #: logged once per kind per interval: an attack must not flood the log.
    throttle: LogThrottle = field(init=False)

    def __post_init__(self) -> None:
        self.catchups = asyncio.Semaphore(self.config.catchup_concurrency)
        self.throttle = LogThrottle(log)


class Slot:
    """A request's place in the reply queue."""

    __slots__ = ("cid", "done", "frames", "owner", "ref", "turn")

    def __init__(self, owner: Session, ref: str | None = None, cid: str | None = None) -> None:
        self.owner = owner
        self.ref = ref
        self.cid = cid
        self.frames: Sequence[bytes] = ()
        self.done = False
        #: Set when a request that must wait for its turn is waiting.
        self.turn: asyncio.Future[None] | None = None


class Session:
    # Slots: an idle connection's memory is mostly this object and its connection's.
    __slots__ = (
        "answered",
        "bucket",
        "ctx",
        "gone",
        "hold",
        "link",
        "nick",
        "nick_key",
        "queue",
        "replies",
        "rooms",
        "since",
        "strikes",
        "worker",
    )

    def __init__(self, ctx: Context, link: Link) -> None:
        self.ctx = ctx
        self.link = link
        self.nick = ""
        self.nick_key = ""
        #: Direct messages with a larger id belong to this nick's registration.
        self.since = 0
        self.rooms: list[str] = []
        self.hold: Hold | None = None
        self.bucket = TokenBucket(ctx.config.rate, ctx.config.burst)
        self.strikes = 0
        self.gone = False
        # Requests waiting for the worker, and reply places in order: created when a frame
        # comes in and dropped once empty. Lists, not deques: at most BACKLOG_HIGH long, so
        # taking the first is cheap, and an almost empty deque costs 624 bytes, a list 56
        # (this is per connection, while a burst of hellos waits for the store).
        self.queue: list[tuple[Slot, ClientFrame]] | None = None
        self.replies: list[Slot] | None = None
        self.worker: asyncio.Task[None] | None = None
        #: While a flooding connection waits for its last answers: done when all are out.
        self.answered: asyncio.Future[None] | None = None

    # --- the connection's life, as the link reports it ------------------------------------

    def opened(self) -> None:
        metrics.CONNECTIONS.inc()
        # The connection layer's sweep enforces it: no timer per connection.
        self.link.close_after(self.ctx.config.hello_timeout, CloseCode.POLICY, "no hello in time")

    @property
    def flooding(self) -> bool:
        """Refused frames in a row reached the limit: the connection is closing (1008)."""
        return self.strikes >= self.ctx.config.flood_strikes

    def received(self, data: str | bytes) -> None:
        """One frame from the client: answer it at once or queue it for the worker."""
        if self.gone or self.flooding:
            return  # gone, or flooding: closing once what came before is answered
        slot = Slot(self)
        replies = self.replies
        if replies is None:
            replies = self.replies = []
        replies.append(slot)
        try:
            request = self._admit(slot, data)
        except Exception:
            self.ctx.throttle.log(
                logging.ERROR,
                "read-failed",
                "reading a frame from %s failed",
                self.link.remote,
                exc_info=True,
            )
            self._fill(slot, [_error(ErrorCode.INTERNAL, _INTERNAL)])
            return
        if request is None:
            return
        if self.queue is None:
            self.queue = []
        self.queue.append((slot, request))
        if self.worker is None:
            self.worker = self.link.spawn(self._work())
        if len(replies) >= BACKLOG_HIGH:
            self.link.pause_reading()

    def closed(self, code: int, reason: str) -> None:
        """The connection layer says the WebSocket closed (1006: without a close frame)."""
        metrics.CONNECTIONS.dec()
        self._stop()
        log.info(
            "%s (%s) disconnected: code %s %s", self.nick or "?", self.link.remote, code, reason
        )

    def _stop(self) -> None:
        """Cancel pending work and leave every room; nothing more is answered."""
        self.gone = True
        self.queue = self.replies = None
        self._all_answered()
        self.link.resume_reading()
        if self.worker is not None:
            self.worker.cancel()
            self.worker = None
        self._depart()

    def kick(self, code: int, reason: str) -> None:
        """Close the connection, and be gone from now on."""
        if not self.gone:
            kind = reason.partition(":")[0]  # "too slow", "flooding", "replaced", ...
            self.ctx.throttle.warning(
                "kick-" + kind, "closing %s (%s): %s", self.nick or "?", self.link.remote, reason
            )
            self._stop()
        self.link.close(code, reason)

    def _depart(self) -> None:
        hub = self.ctx.hub
        if not self.nick_key or hub.online.get(self.nick_key) is not self:
            return
        if self.ctx.cluster is not None:
            self.ctx.cluster.offline(self)
        for room in hub.remove(self):
            self.ctx.presence.left(room, self.nick)

    # --- admission: decoding, rate limit, parsing -----------------------------------------

    def _admit(self, slot: Slot, data: str | bytes) -> ClientFrame | None:
        """The parsed request, or None when the frame was answered (refused) already."""
        refusal: ProtocolError | None = None
        raw: Frame | None = None
        try:
            raw = decode(data)
            slot.cid = cid_of(raw)
            slot.ref = ref_of(raw)
        except ProtocolError as exc:
            refusal = exc
        wait = self.bucket.take()
        if wait:
            self.strikes += 1
            if self.flooding:
                # Every frame read so far is answered (this one too), then the close.
                self.link.pause_reading()
                self.link.spawn(self._close_when_answered())
            refusal = ProtocolError(
                ErrorCode.RATE_LIMITED,
                "too many frames on this connection; slow down",
                retry_after=_seconds(wait),
            )
        else:
            self.strikes = 0
        if refusal is None:
            assert raw is not None
            try:
                return parse_client_frame(raw)
            except ProtocolError as exc:
                refusal = exc
        self._fill(slot, [self._refusal(slot, refusal)])
        return None

    # --- the reply queue --------------------------------------------------------------

    def _fill(self, slot: Slot, frames: Sequence[bytes]) -> None:
        """Give a place its answer and send whatever is now first in line."""
        self.settle(slot, frames)
        data = self.ready()
        if data:
            self.link.write(data)
            self.ctx.hub.check(self)

    def settle(self, slot: Slot, frames: Sequence[bytes]) -> None:
        """Give a place its answer without sending anything yet (see :meth:`ready`)."""
        slot.frames = frames
        slot.done = True

    def ready(self) -> list[bytes]:
        """Take the answers that are now first in line, in order."""
        data: list[bytes] = []
        replies = self.replies
        if replies is None:
            return data
        while replies and replies[0].done:
            data.extend(replies.pop(0).frames)
        if replies:
            turn = replies[0].turn
            if turn is not None and not turn.done():
                turn.set_result(None)
        else:
            self.replies = None
            self._all_answered()
        if len(replies) <= BACKLOG_LOW and not self.flooding:
            self.link.resume_reading()
        return data

    def _all_answered(self) -> None:
        answered = self.answered
        if answered is not None and not answered.done():
            answered.set_result(None)

    async def _close_when_answered(self) -> None:
        """Close a flooding connection (1008) once every frame it sent before the last
        strike has its answer on the way: acks of accepted sends included."""
        if self.replies is not None:
            self.answered = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(FLOOD_CLOSE_WITHIN):
                    await self.answered
            except TimeoutError:
                pass
            self.answered = None
        self.kick(CloseCode.POLICY, "flooding: too many frames over the rate limit")

    async def _turn(self, slot: Slot) -> None:
        """Wait until every earlier request has been answered."""
        if self.replies and self.replies[0] is not slot:
            slot.turn = asyncio.get_running_loop().create_future()
            await slot.turn

    def _refusal(self, slot: Slot, exc: ProtocolError) -> bytes:
        return _error(exc.code, exc.message, slot.ref, slot.cid, **exc.extra)

    def acked(self, slot: Slot, message: StoredMessage) -> None:
        """The store committed this slot's message (the server sends :meth:`ready` after)."""
        self.settle(slot, [ack_frame(message, slot.ref)])

    def refused(self, slot: Slot, error: Exception) -> None:
        """The store could not commit this slot's message."""
        if isinstance(error, StoreUnavailable):
            frame = _error(
                ErrorCode.UNAVAILABLE,
                f"not stored, send it again later: {error}",
                slot.ref,
                slot.cid,
            )
        else:
            frame = _error(ErrorCode.INTERNAL, _INTERNAL_SEND, slot.ref, slot.cid)
        if not self.gone:
            self._fill(slot, [frame])

    # --- the worker -------------------------------------------------------------------

    async def _work(self) -> None:
        try:
            while self.queue:
                slot, request = self.queue.pop(0)
                if not self.queue:
                    self.queue = None
                try:
                    await self._handle(slot, request)
                except ProtocolError as exc:
                    self._fill(slot, [self._refusal(slot, exc)])
                except StoreUnavailable as exc:
                    message = f"the database is unavailable: {exc}"
                    self._fill(slot, [_error(ErrorCode.UNAVAILABLE, message, slot.ref, slot.cid)])
                except _CatchupFailed:
                    return
                except Exception:
                    kind = type(request).__name__
                    self.ctx.throttle.log(
                        logging.ERROR,
                        "failed-" + kind,
                        "request %s from %s failed",
                        kind,
                        self.nick,
                        exc_info=True,
                    )
                    self._fill(slot, [_error(ErrorCode.INTERNAL, _INTERNAL, slot.ref, slot.cid)])
        finally:
            if self.worker is asyncio.current_task():
                self.worker = None

    async def _handle(self, slot: Slot, request: ClientFrame) -> None:
        if isinstance(request, Send):
            if not self.nick_key:
                raise ProtocolError(ErrorCode.HELLO_FIRST, "the first frame must be hello")
            await self._send(slot, request)  # answered when its batch commits
            return
        await self._turn(slot)
        # Not before the last reply has left: a client that asks and never reads then
        # holds one reply in memory, not one per request it pipelined (its later
        # requests wait, unread, in its socket), and costs no reads it will not take.
        await self.link.drain()
        if isinstance(request, Hello):
            if self.nick_key:
                raise ProtocolError(ErrorCode.ALREADY_HELLO, "hello was already accepted")
            await self._hello(request, slot.ref)
            self._fill(slot, ())
        elif not self.nick_key:
            raise ProtocolError(ErrorCode.HELLO_FIRST, "the first frame must be hello")
        else:
            self._fill(slot, await _HANDLERS[type(request)](self, request, slot.ref))

    # --- limits -----------------------------------------------------------------------

    async def _charge(self, *costs: tuple[Limit, str, float]) -> None:
        """Take every cost from its quota, or none of them and refuse with ``rate_limited``."""
        quotas = self.ctx.quotas
        taken: list[tuple[Limit, str, float]] = []
        for limit, key, cost in costs:
            if cost <= 0:
                continue
            wait = await quotas.take(limit, key, cost)
            if wait:
                for done in taken:
                    await quotas.give_back(*done)
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"over the limit of {limit.value}; try again in {_after(wait)}",
                    retry_after=_seconds(wait),
                )
            taken.append((limit, key, cost))

    async def _new_rooms(self, rooms: Sequence[str], cost: float) -> None:
        """Charge a catch-up and any new rooms, then record the new rooms."""
        store = self.ctx.store
        new = await store.missing_rooms(rooms)
        ip = self.link.ip
        await self._charge(
            (Limit.ADDRESS_CATCHUP, ip, cost), (Limit.ADDRESS_ROOMS, ip, float(len(new)))
        )
        if new:
            await store.create_rooms(new)

    # --- claiming a nick ----------------------------------------------------------------

    async def _claim(self, nick: str, secret: str | None) -> NickClaim:
        key = nick_key(nick)
        quotas, ip = self.ctx.quotas, self.link.ip
        wait = await quotas.take(Limit.ADDRESS_NICKS, ip)
        claim = await self.ctx.store.claim_nick(
            nick,
            key,
            secret,
            online=self.ctx.hub.is_online(key),
            may_register=not wait,
            claim_ttl=self.ctx.config.nick_claim_ttl,
        )
        if not wait and claim.status is not ClaimStatus.REGISTERED:
            await quotas.give_back(Limit.ADDRESS_NICKS, ip)
        if claim.status is ClaimStatus.TAKEN:
            raise ProtocolError(
                ErrorCode.NICK_TAKEN,
                f"the nick {claim.nick!r} is registered; claiming it needs its secret",
            )
        if claim.status is ClaimStatus.NOT_ALLOWED:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"over the limit of {Limit.ADDRESS_NICKS.value}; try again in {_after(wait)}",
                retry_after=_seconds(wait),
            )
        if claim.status is ClaimStatus.WEAK_SECRET:
            raise ProtocolError(
                ErrorCode.BAD_FRAME, "a proposed secret must be at least 22 characters"
            )
        return claim

    def _replace(self, holder: Member | None) -> list[str]:
        """Close another live session of the nick being claimed; the rooms it was in."""
        if holder is None or holder is self:
            return []
        rooms = self.ctx.hub.remove(holder)  # silently: the nick stays where it was
        holder.kick(CloseCode.REPLACED, f"replaced: this nick connected again from {self.link.ip}")
        return rooms

    # --- hello and the catch-up ------------------------------------------------------------

    async def _hello(self, hello: Hello, ref: str | None) -> None:
        # The client said hello in time: while it is answered, a deadline is the
        # database's fault, and the close says so (1011, retry) instead of blaming the
        # client (1008). A refused hello gives the client its own deadline back.
        timeout = self.ctx.config.hello_timeout
        self.link.close_after(
            timeout, CloseCode.INTERNAL, "the database did not answer your hello in time"
        )
        try:
            await self._welcome(hello, ref)
        except BaseException:
            if not self.nick:
                self.link.close_after(timeout, CloseCode.POLICY, "no hello in time")
            raise

    async def _welcome(self, hello: Hello, ref: str | None) -> None:
        await self._new_rooms(hello.rooms, len(hello.rooms) + 1)
        claim = await self._claim(hello.nick, hello.secret)
        key = nick_key(claim.nick)
        elsewhere = await self._go_online(claim.nick, hello.rooms, hello.takeover)
        # From here to the hub, no await: one nick, one live session.
        hub, presence = self.ctx.hub, self.ctx.presence
        holder = hub.online.get(key)
        if holder is not None and not hello.takeover:
            raise ProtocolError(
                ErrorCode.NICK_IN_USE, f"{claim.nick} is connected elsewhere; nothing was changed"
            )
        self.nick, self.nick_key, self.since = claim.nick, key, claim.since
        # Once each: a replaced session on this replica is in both (the database lists
        # every other session of the nick), and a room left twice would say so twice.
        previous = list(dict.fromkeys(self._replace(holder) + elsewhere))
        self.link.close_after(None)
        self.hold = Hold()
        hub.add(self)
        for room in hello.rooms:
            hub.join(self, room)
        welcome: Frame = {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "nick": self.nick,
            "epoch": self.ctx.store.epoch,
            "limits": self.ctx.limits,
        }
        if claim.new_secret is not None:
            welcome["secret"] = claim.new_secret
        if claim.status is ClaimStatus.REGISTERED:
            welcome["registered"] = True
        if ref is not None:
            welcome["ref"] = ref
        frames = [encode(welcome)]
        for room in hello.rooms:
            frames.append(self._joined(room, None))
            if room in previous:
                presence.seen(room, self)
            else:
                presence.joined(room, self)
        for room in previous:
            if room not in hello.rooms:
                presence.left(room, self.nick)
        log.info("%s (%s) joined %s", self.nick, self.link.remote, ", ".join(hello.rooms))
        # ``frames`` go out with the catch-up's first write, and ``synced`` with the held
        # live frames: a resume of a few dozen messages is two socket writes, not five.
        covered: Covered = _nothing
        try:
            if hello.resume is not None:
                covered, newest = await self._replay(hello.resume, hello.rooms, frames)
            else:
                covered, newest = await self._recent(hello.rooms, hello.history, frames)
            await self._caught_up(newest)
            frames.append(_SYNCED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable | _CatchupFailed):
                log.exception("the catch-up of %s failed", self.nick)
            if frames and not self.gone:  # welcome was not sent yet: it goes before the close
                self.link.write(frames)
            self.kick(CloseCode.INTERNAL, "the catch-up failed; reconnect with resume")
            raise _CatchupFailed from exc
        finally:
            self._release(covered, frames)

    async def _go_online(self, nick: str, rooms: Sequence[str], takeover: bool) -> list[str]:
        """In a cluster: become the nick's one live session on every replica (else no-op).

        Returns the rooms the nick was in on other replicas (a takeover from there is not
        a join). Raises ``nick_in_use`` (``takeover`` false and the nick is live
        elsewhere) or StoreUnavailable; closes with 4001 when another session of the
        nick went online after this one while it waited.
        """
        cluster = self.ctx.cluster
        if cluster is None:
            return []
        taken = await cluster.online(self, nick, nick_key(nick), rooms, takeover, self.link.ip)
        if taken is None:
            raise ProtocolError(
                ErrorCode.NICK_IN_USE, f"{nick} is connected elsewhere; nothing was changed"
            )
        return taken

    async def _caught_up(self, newest: int) -> None:
        """Before a hold ends, let the fan-out pass what the catch-up read (``newest``, the
        highest id it sent; ``chat_server.fanout.Delivered`` says why).

        When that cannot be known the connection is closed (the client resumes) rather
        than risk showing a message twice.
        """
        cluster = self.ctx.cluster
        if cluster is not None:
            caught_up = await cluster.caught_up()
        else:
            caught_up = await self.ctx.delivered.reached(newest)
        if not caught_up:
            self.kick(CloseCode.INTERNAL, "the live stream is unavailable; reconnect with resume")
            raise _CatchupFailed

    def _joined(self, room: str, ref: str | None) -> bytes:
        members, more = self.ctx.hub.member_page(room, None, MEMBERS_MAX)
        joined: Frame = {"type": "joined", "room": room, "members": members}
        if more:
            joined["more"] = True
        if ref is not None:
            joined["ref"] = ref
        return encode(joined)

    async def _replay(
        self, after: int, rooms: Sequence[str], head: list[bytes]
    ) -> tuple[Covered, int]:
        """Everything after ``after``: the newest that fit the budgets, oldest first;
        and the newest id sent (0 if none).

        ``head``: frames to send before anything else, emptied once they are written (as
        in every catch-up below)."""
        recent = self.ctx.recent
        if recent is not None:
            replayed = await self._replay_recent(recent, after, rooms, head)
            if replayed is not None:
                return replayed
        config, encoded = self.ctx.config, self._frame
        scope = Scope(rooms=tuple(rooms), key=self.nick_key, direct=True, since=self.since)
        count = size = 0
        newest = oldest = 0
        truncated = False
        kept: list[bytes] | None = []
        # First pass, newest first: how far back the budgets reach.
        async with aclosing(self._pages(scope, after=after, page=16)) as pages:
            async for page in pages:
                for message in page:
                    data = encoded(message)
                    if count == config.resume_cap or (
                        count and size + len(data) > config.resume_bytes
                    ):
                        truncated = True
                        break
                    count, size = count + 1, size + len(data)
                    newest, oldest = newest or message.id, message.id
                    if kept is not None and size <= REPLAY_KEEP_BYTES:
                        kept.append(data)
                    else:
                        kept = None
                if truncated:
                    break
        if truncated:
            metrics.RESUME_GAPS.inc()
            head.append(encode({"type": "gap", "after": after, "before": oldest}))
        if kept is not None:
            await self._paced(kept[::-1], head)
        elif count:
            # Second pass, oldest first, a page at a time: never the whole replay in memory.
            async for page in self._pages(
                scope, after=oldest - 1, before=newest + 1, oldest_first=True, page=16
            ):
                await self._paced([encoded(message) for message in page], head)
        high = max(after, newest)
        return (lambda message: message.id <= high), newest

    async def _replay_recent(
        self, recent: RecentRooms, after: int, rooms: Sequence[str], head: list[bytes]
    ) -> tuple[Covered, int] | None:
        """:meth:`_replay` from the rooms' tails in memory and the direct messages from the
        store; None (nothing sent) when the tails do not hold the replay or the direct
        messages are many: the caller then reads it all from the store."""
        config, encoded = self.ctx.config, self._frame
        cap = config.resume_cap
        await recent.load(rooms, after, cap)
        # One point in the commit order for both parts: everything up to ``bound`` is
        # replayed (or reported by a gap), everything after it comes through the hold.
        bound = recent.watermark
        direct: list[StoredMessage] = []
        size = 0
        scope = Scope(key=self.nick_key, direct=True, since=self.since)
        async with aclosing(self._pages(scope, after=after, before=bound + 1, page=16)) as pages:
            async for page in pages:
                direct.extend(page)
                size += sum(len(encoded(message)) for message in page)
                if size > REPLAY_KEEP_BYTES:
                    return None
        shared = recent.read(rooms, after, bound, cap)
        if shared is None:
            return None
        messages = list(merge(shared, direct[::-1], key=_message_id)) if direct else shared
        # Newest first: how far back the budgets reach.
        count = size = 0
        start = len(messages)
        while start and count < cap:
            data = encoded(messages[start - 1])
            if count and size + len(data) > config.resume_bytes:
                break
            count, size, start = count + 1, size + len(data), start - 1
        if start:
            metrics.RESUME_GAPS.inc()
            gap = {"type": "gap", "after": after, "before": messages[start].id}
            head.append(encode(gap))
        part = PACE_BYTES // 256  # messages encoded per part, a few parts per write
        for low in range(start, len(messages), part):
            await self._paced([encoded(message) for message in messages[low : low + part]], head)
        high = max(after, bound)
        return (lambda message: message.id <= high), (messages[-1].id if messages else 0)

    async def _recent(
        self, rooms: Sequence[str], limit: int, first: list[bytes]
    ) -> tuple[Covered, int]:
        """The newest ``limit`` messages of each room and of the nick's DMs; and the
        newest id sent (0 if none)."""
        config = self.ctx.config
        share = min(config.history_bytes, config.catchup_bytes // (len(rooms) + 1))
        newest: dict[str, int] = {}
        for room in rooms:
            head: Frame = {"type": "history", "room": room}
            frame, newest[room] = await self._history(
                head, Scope(rooms=(room,)), None, limit, share
            )
            await self._paced([frame], first)
        scope = Scope(key=self.nick_key, direct=True, since=self.since)
        head = {"type": "history", "direct": True}
        frame, newest_dm = await self._history(head, scope, None, limit, share)
        await self._paced([frame], first)

        def covered(message: StoredMessage) -> bool:
            if message.room is None:
                return message.id <= newest_dm
            return message.id <= newest.get(message.room, 0)

        return covered, max([newest_dm, *newest.values()])

    def _frame(self, message: StoredMessage) -> bytes:
        """A stored message's ``msg`` frame for this session's catch-up.

        When a registration expires unconfirmed and the nick is registered afresh, the
        earlier holder's cids are retired in the store (``~<id>``), but frames encoded
        before that, and the rooms' tails, still carry them; this holder's client would
        take such a cid for one of its own unsent messages and drop it. A message of
        this nick older than its registration (``since``) is an earlier holder's.
        """
        if message.id <= self.since and message.sender_key == self.nick_key:
            return msg_frame(replace(message, cid=f"~{message.id}"))
        return self.ctx.encoded(message)

    async def _history(
        self,
        head: Frame,
        scope: Scope,
        before: int | None,
        limit: int,
        budget: int,
        ref: str | None = None,
    ) -> tuple[bytes, int]:
        """A ``history`` frame: the newest messages within ``limit`` and ``budget`` bytes
        (always one at least), oldest first; and the newest id in it (0 if none)."""
        encoded = self._frame
        taken: list[bytes] = []
        size = 2  # the brackets of the messages array; each message adds itself and a comma
        more = False
        newest = 0
        # A first page about as large as the budget holds of typical messages.
        first = max(2, min(limit + 1, budget // 2048))
        pages = self.ctx.store.messages(scope, before=before, page=first)
        async with self.ctx.catchups, aclosing(pages):
            async for page in pages:
                for message in page:
                    data = b"" if len(taken) == limit else encoded(message)
                    if len(taken) == limit or (taken and size + len(data) + 1 > budget):
                        more = True
                        break
                    taken.append(data)
                    size += len(data) + 1
                    newest = newest or message.id
                if more:
                    break
        tail: Frame = {"more": more}
        if ref is not None:
            tail["ref"] = ref
        # Spliced, not re-encoded: the messages are encoded once, to be measured.
        frame = (
            encode(head)[:-1] + b',"messages":[' + b",".join(taken[::-1]) + b"]," + encode(tail)[1:]
        )
        return frame, newest

    async def _pages(self, scope: Scope, **query: Any) -> AsyncGenerator[list[StoredMessage], None]:
        """The store's pages of a scope, each read under the server-wide catch-up cap."""
        pages = self.ctx.store.messages(scope, **query)
        try:
            while True:
                async with self.ctx.catchups:
                    try:
                        page = await anext(pages)
                    except StopAsyncIteration:
                        return
                yield page
        finally:
            await pages.aclose()

    async def _paced(self, frames: list[bytes], head: list[bytes] | None = None) -> None:
        """Write catch-up frames as fast as the client reads them, and no faster: in parts
        of about ``PACE_BYTES`` (one socket write each), waiting while the socket's buffer
        is full between them. ``head`` (emptied) goes first, in the same write."""
        part: list[bytes] = []
        size = 0
        if head:
            part, size = head[:], sum(map(len, head))
            head.clear()
        for data in frames:
            part.append(data)
            size += len(data)
            if size >= PACE_BYTES:
                self.link.write(part)
                await self.link.drain()
                part, size = [], 0
        if part:
            self.link.write(part)
            await self.link.drain()

    def _release(self, covered: Covered, first: Sequence[bytes] = ()) -> None:
        """End a hold: write ``first``, then what live traffic came in, minus what the
        catch-up sent, in one write."""
        held, self.hold = self.hold.frames if self.hold else [], None
        data = [*first]
        data.extend(frame for frame, message in held if message is None or not covered(message))
        if data and not self.gone:
            self.link.write(data)
            self.ctx.hub.check(self)

    # --- requests --------------------------------------------------------------------------

    async def _send(self, slot: Slot, send: Send) -> None:
        recipient_key = recipient = None
        if send.room is not None:
            if not self.ctx.hub.is_member(self, send.room):
                raise ProtocolError(
                    ErrorCode.NOT_IN_ROOM, f"join #{send.room} before sending to it"
                )
        else:
            assert send.to is not None
            recipient_key = nick_key(send.to)
            online = self.ctx.hub.online.get(recipient_key)
            if online is not None:
                recipient = online.nick
            else:
                recipient = await self.ctx.store.registered_nick(recipient_key)
            if recipient is None:
                raise ProtocolError(ErrorCode.NO_SUCH_NICK, f"nobody has the nick {send.to!r}")
        await self._charge(
            (Limit.NICK_MESSAGES, self.nick_key, 1.0), (Limit.ADDRESS_MESSAGES, self.link.ip, 1.0)
        )
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
                origin=slot,
            )
        )

    async def _join(self, join: Join, ref: str | None) -> Sequence[bytes]:
        hub = self.ctx.hub
        already = hub.is_member(self, join.room)
        if not already and len(self.rooms) >= MAX_ROOMS:
            raise ProtocolError(ErrorCode.TOO_MANY_ROOMS, f"at most {MAX_ROOMS} rooms at once")
        await self._new_rooms([join.room], 1)
        if self.ctx.cluster is not None and not already:
            await self.ctx.cluster.room(self, join.room, joined=True)
        self.hold = Hold()
        covered: Covered = _nothing
        try:
            hub.join(self, join.room)
            self.link.write([self._joined(join.room, ref)])
            if already:
                self.ctx.presence.seen(join.room, self)
            else:
                self.ctx.presence.joined(join.room, self)
            head = {"type": "history", "room": join.room}
            scope = Scope(rooms=(join.room,))
            budget = self.ctx.config.history_bytes
            frame, newest = await self._history(head, scope, None, HISTORY_DEFAULT, budget)
            await self._paced([frame])
            covered = lambda m: m.room == join.room and m.id <= newest  # noqa: E731
            await self._caught_up(newest)
        finally:
            self._release(covered)
        return ()

    async def _leave(self, leave: Leave, ref: str | None) -> Sequence[bytes]:
        hub = self.ctx.hub
        if not hub.is_member(self, leave.room):
            raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"you are not in #{leave.room}")
        if self.ctx.cluster is not None:
            await self.ctx.cluster.room(self, leave.room, joined=False)
        hub.leave(self, leave.room)
        self.ctx.presence.left(leave.room, self.nick)
        return [encode(_with_ref({"type": "left", "room": leave.room}, ref))]

    async def _nick(self, request: Nick, ref: str | None) -> Sequence[bytes]:
        claim = await self._claim(request.nick, request.secret)
        elsewhere = await self._go_online(claim.nick, self.rooms, request.takeover)
        hub, presence = self.ctx.hub, self.ctx.presence
        key = nick_key(claim.nick)
        holder = hub.online.get(key)
        if holder is not None and holder is not self and not request.takeover:
            raise ProtocolError(
                ErrorCode.NICK_IN_USE, f"{claim.nick} is connected elsewhere; nothing was changed"
            )
        old, rooms = self.nick, list(self.rooms)
        taken = self._replace(holder) + elsewhere
        hub.remove(self)
        self.nick, self.nick_key, self.since = claim.nick, key, claim.since
        hub.add(self)
        for room in rooms:
            hub.join(self, room)
        for room in rooms:
            if room in taken:  # the new nick was there already: the old one leaves
                presence.left(room, old)
            elif old != self.nick:
                presence.renamed(room, old, self)
        for room in taken:
            if room not in rooms:
                presence.left(room, self.nick)
        reply: Frame = {"type": "renamed", "old": old, "nick": self.nick}
        if claim.new_secret is not None:
            reply["secret"] = claim.new_secret
        if claim.status is ClaimStatus.REGISTERED:
            reply["registered"] = True
        log.info("%s (%s) is now %s", old, self.link.remote, self.nick)
        return [encode(_with_ref(reply, ref))]

    async def _who(self, who: Who, ref: str | None) -> Sequence[bytes]:
        await self._charge((Limit.ADDRESS_CATCHUP, self.link.ip, 1.0))
        nicks, more = self.ctx.hub.member_page(who.room, who.after, MEMBERS_MAX)
        reply: Frame = {"type": "members"}
        if who.room is not None:
            reply["room"] = who.room
            if self.ctx.hub.is_member(self, who.room):
                self.ctx.presence.seen(who.room, self)
        reply["nicks"] = nicks
        if more:
            reply["more"] = True
        return [encode(_with_ref(reply, ref))]

    async def _rooms(self, request: Rooms, ref: str | None) -> Sequence[bytes]:
        await self._charge((Limit.ADDRESS_CATCHUP, self.link.ip, 1.0))
        names, more = await self.ctx.store.room_page(request.after, request.limit)
        hub = self.ctx.hub
        rooms = [{"name": name, "members": hub.count(name)} for name in names]
        return [encode(_with_ref({"type": "rooms", "rooms": rooms, "more": more}, ref))]

    async def _history_request(self, request: History, ref: str | None) -> Sequence[bytes]:
        await self._charge((Limit.ADDRESS_CATCHUP, self.link.ip, 1.0))
        head: Frame = {"type": "history"}
        if request.room is not None:
            head["room"] = request.room
            scope = Scope(rooms=(request.room,))
        elif request.with_nick is not None:
            head["with"] = request.with_nick
            other = nick_key(request.with_nick)
            scope = Scope(key=self.nick_key, with_key=other, since=self.since)
        else:
            head["direct"] = True
            scope = Scope(key=self.nick_key, direct=True, since=self.since)
        budget = self.ctx.config.history_bytes
        frame, _ = await self._history(head, scope, request.before, request.limit, budget, ref)
        return [frame]


class _CatchupFailed(Exception):
    """A catch-up failed after ``welcome``: the connection is being closed with 1011."""


#: Request type -> handler, shared by all sessions rather than bound per connection.
_HANDLERS: dict[type, Callable[[Session, Any, str | None], Awaitable[Sequence[bytes]]]] = {
    Join: Session._join,
    Leave: Session._leave,
    Nick: Session._nick,
    Who: Session._who,
    Rooms: Session._rooms,
    History: Session._history_request,
}

_SYNCED = encode({"type": "synced"})
_INTERNAL = "the server failed on this request (logged); nothing was changed, try again"
_INTERNAL_SEND = "the server failed on this message (logged); send it again with the same cid"


def _error(
    code: ErrorCode,
    message: str,
    ref: str | None = None,
    cid: str | None = None,
    **extra: Any,
) -> bytes:
    metrics.ERRORS.labels(code.value).inc()
    frame: Frame = {"type": "error", "code": code.value, "message": message}
    if ref is not None:
        frame["ref"] = ref
    if cid is not None:
        frame["cid"] = cid
    frame.update(extra)
    return encode(frame)


def _seconds(wait: float) -> float:
    """A retry_after value: seconds, rounded up to the millisecond."""
    return max(0.001, round(wait + 0.0005, 3))


def _after(wait: float) -> str:
    """The wait for a person to read, never shorter than ``retry_after``: milliseconds
    under a second ("15 ms", not "0.0 s"), else seconds rounded up to a tenth."""
    seconds = _seconds(wait)
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    return f"{math.ceil(seconds * 10) / 10:.1f} s"


def _nothing(message: StoredMessage) -> bool:
    return False


def _message_id(message: StoredMessage) -> int:
    return message.id


def _with_ref(frame: Frame, ref: str | None) -> Frame:
    if ref is not None:
        frame["ref"] = ref
    return frame
