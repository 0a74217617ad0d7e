"""Fan-out: who is online, who is in which room, and writing one frame to many of them.

A frame is encoded once and written to every recipient's link synchronously: no task per
recipient and no await, so a message reaches all members of a room in the same
event-loop step, in id order. Because such writes have no backpressure, the hub checks
each recipient's outgoing buffer after writing and drops a member whose buffer passed
``buffer_limit`` bytes: a stuck reader costs a bounded amount of memory and never delays
anybody else.

Writes are few and large: a batch committed together costs one socket write per
recipient, and each frame is framed once for all of them. A write to a socket costs the
server more kernel time than fanning a message out costs Python (on loopback about 15 µs,
whatever its size; see docs/benchmarks.md), so with a *delivery window* (``window``,
``CHAT_DELIVERY_WINDOW_MS``) the hub writes to each recipient at most once per window:
what is published less than a window after the last write waits in the links
(:meth:`~chat_server.connections.Link.defer_framed`) until the window ends, and several
commits share one write. The price is latency: at most one window, and only under
continuous traffic (whatever comes after a quiet spell goes at once). The senders of a
batch get their acks at once, with whatever waited for them. A link sends what waited
before anything written to it later, so the order each recipient sees never changes;
slow readers are checked when the window ends.

A member may be *holding*: while its session sends a catch-up (history or a replay) from
the store, live frames for it are kept in order in ``member.hold`` and written after the
catch-up, so nothing falls between the stored past and the live stream. The catch-up
itself is paced by the client's reading and is not counted against the limit; the hold
is.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from chat_protocol import CloseCode
from chat_server.connections import Link, frame_text
from chat_server.messages import StoredMessage

log = logging.getLogger(__name__)

#: A frame waiting in a hold: its bytes, and the stored message it carries, if any.
Held = tuple[bytes, StoredMessage | None]


class Hold:
    """Frames kept for a member during its catch-up, in order, with their total size."""

    __slots__ = ("frames", "size")

    def __init__(self) -> None:
        self.frames: list[Held] = []
        self.size = 0

    def append(self, data: bytes, message: StoredMessage | None) -> None:
        self.frames.append((data, message))
        self.size += len(data)


#: One frame for some recipients: who, the encoded frame, the stored message it carries.
Delivery = tuple[Iterable["Member"], bytes, StoredMessage | None]


class Member(Protocol):
    link: Link
    nick: str
    nick_key: str
    hold: Hold | None
    #: The rooms this member is in, kept by the hub.
    rooms: list[str]

    def kick(self, code: int, reason: str) -> None:
        """Close the member's connection in the background and take it out of the hub."""


class RemoteView(Protocol):
    """Who is online on the *other* replicas of a cluster (``chat_server.cluster``)."""

    def nicks(self, room: str | None) -> list[str]:
        """Nicks in ``room`` elsewhere; with None, every nick online elsewhere."""

    def count(self, room: str) -> int:
        """Members of ``room`` elsewhere."""

    def is_online(self, key: str) -> bool:
        """Whether the nick is live on another replica."""


class Delivered:
    """How far the fan-out has got: the newest message id delivered here, and a way to
    wait until it passes an id.

    A catch-up reads the database, which can show a commit before the fan-out has
    delivered it: SQLite's writer thread commits and only then does the event loop hear
    of it; a cluster replica hears of it on its notification stream later still. So a
    session keeps holding live frames until the fan-out has passed every id its catch-up
    read; what it releases then can only be newer, and nothing is shown twice.
    """

    __slots__ = ("_waiters", "position", "timeout")

    def __init__(self, position: int = 0, timeout: float = 10.0) -> None:
        self.position = position
        self.timeout = timeout
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def advance(self, position: int) -> None:
        if position <= self.position:
            return
        self.position = position
        if self._waiters:
            waiting = []
            for target, future in self._waiters:
                if target <= position:
                    if not future.done():
                        future.set_result(None)
                elif not future.done():
                    waiting.append((target, future))
            self._waiters = waiting

    async def reached(self, target: int) -> bool:
        """Wait until every id up to ``target`` has been delivered; False after
        ``timeout`` seconds (a batch whose fan-out failed never arrives)."""
        if self.position >= target:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        try:
            await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            return False
        return True


class Hub:
    def __init__(self, buffer_limit: int, window: float = 0.0) -> None:
        self.buffer_limit = buffer_limit
        #: The delivery window in seconds (0: every batch is written as it is published).
        self.window = window
        #: Members whose links hold frames until the window ends.
        self._waiting: dict[Member, None] = {}
        #: The timer that ends the window (None: no window open).
        self._window_end: asyncio.TimerHandle | None = None
        #: Loop time of the last write to all recipients: a window starts there.
        self._written = float("-inf")
        self.online: dict[str, Member] = {}
        self.rooms: dict[str, dict[str, Member]] = {}
        #: Nicks in case-insensitive order, per room and (under None) of everyone online,
        #: kept as members come and go: a page of members is a bisect and a slice, not a
        #: sort of the whole room for every joiner (a mass join would cost N² log N).
        self._sorted: dict[str | None, list[str]] = {None: []}
        #: In a cluster: the other replicas' members, so that who/rooms/joined see them.
        self.remote: RemoteView | None = None

    # --- membership ------------------------------------------------------------------

    def add(self, member: Member) -> None:
        other = self.online.get(member.nick_key)
        if other is not None:
            self._unlist(None, other.nick)
        self.online[member.nick_key] = member
        insort(self._sorted[None], member.nick, key=str.lower)

    def remove(self, member: Member) -> list[str]:
        """Forget a member everywhere, silently; returns the rooms it was in."""
        if self.online.get(member.nick_key) is member:
            del self.online[member.nick_key]
            self._unlist(None, member.nick)
        left = list(member.rooms)
        for room in left:
            self.leave(member, room)
        return left

    def join(self, member: Member, room: str) -> bool:
        """Put a member in a room; False if it was in it already."""
        members = self.rooms.setdefault(room, {})
        other = members.get(member.nick_key)
        if other is member:
            return False
        if other is not None:
            self._unlist(room, other.nick)
        members[member.nick_key] = member
        insort(self._sorted.setdefault(room, []), member.nick, key=str.lower)
        member.rooms.append(room)
        return True

    def is_member(self, member: Member, room: str) -> bool:
        return self.rooms.get(room, {}).get(member.nick_key) is member

    def leave(self, member: Member, room: str) -> None:
        if self.is_member(member, room):
            members = self.rooms[room]
            del members[member.nick_key]
            self._unlist(room, member.nick)
            if not members:
                del self.rooms[room]
        if room in member.rooms:
            member.rooms.remove(room)

    def _unlist(self, room: str | None, nick: str) -> None:
        nicks = self._sorted.get(room)
        if nicks is None:
            return
        key = nick.lower()
        at = bisect_left(nicks, key, key=str.lower)
        if at < len(nicks) and nicks[at].lower() == key:
            del nicks[at]
        if not nicks and room is not None:
            del self._sorted[room]

    def members(self, room: str | None) -> list[str]:
        """A room's nicks (everybody online if ``room`` is None), case-insensitive order.

        In a cluster, the members on every replica.
        """
        return list(self._listed(room))

    def _listed(self, room: str | None) -> list[str]:
        """The sorted nicks of ``room``: this process's own list as it is (not a copy),
        merged with the other replicas' members in a cluster."""
        here = self._sorted.get(room, [])
        if self.remote is None:
            return here
        elsewhere = self.remote.nicks(room)
        if not elsewhere:
            return here
        nicks = {nick.lower(): nick for nick in elsewhere}
        nicks.update((nick.lower(), nick) for nick in here)
        return sorted(nicks.values(), key=str.lower)

    def is_online(self, key: str) -> bool:
        """Whether a nick is live here (or, in a cluster, on any replica)."""
        return key in self.online or (self.remote is not None and self.remote.is_online(key))

    def member_page(
        self, room: str | None, after: str | None, limit: int
    ) -> tuple[list[str], bool]:
        """:meth:`members` after the nick ``after``: at most ``limit``, and whether more follow."""
        nicks = self._listed(room)
        start = bisect_right(nicks, after.lower(), key=str.lower) if after is not None else 0
        return nicks[start : start + limit], start + limit < len(nicks)

    def count(self, room: str) -> int:
        here = len(self.rooms.get(room, {}))
        return here + (self.remote.count(room) if self.remote is not None else 0)

    # --- delivery --------------------------------------------------------------------

    def room_members(self, room: str) -> Iterable[Member]:
        return self.rooms.get(room, {}).values()

    def recipients(self, message: StoredMessage) -> list[Member]:
        """This process's members who get a stored message: its room, or the DM's two ends."""
        if message.room is not None:
            return list(self.room_members(message.room))
        keys = dict.fromkeys((message.sender_key, message.recipient_key))
        return [m for key in keys if key is not None and (m := self.online.get(key)) is not None]

    def deliveries(
        self,
        messages: Sequence[StoredMessage],
        presence_first: Callable[[set[str]], list[Delivery]],
        encoded: Callable[[StoredMessage], bytes],
    ) -> tuple[list[Delivery], int]:
        """A committed batch as deliveries, in id order, after its rooms' queued presence
        (``presence_first``: "bob joined" goes before what bob says); and how many
        ``msg`` frames that makes. ``encoded`` gives a message's ``msg`` frame (the
        session context's cache, which catch-ups read too)."""
        rooms = {m.room for m in messages if m.room is not None}
        deliveries = presence_first(rooms)
        count = 0
        for message in messages:
            recipients = self.recipients(message)
            count += len(recipients)
            deliveries.append((recipients, encoded(message), message))
        return deliveries, count

    def publish(
        self, recipients: Iterable[Member], data: bytes, message: StoredMessage | None = None
    ) -> None:
        """Write one encoded frame to every recipient (or to its hold)."""
        self.publish_many([(recipients, data, message)])

    def publish_many(self, items: Iterable[Delivery], now: Iterable[Member] = ()) -> None:
        """Write several frames, in order; each recipient gets all of its frames in one
        write, now or when the delivery window ends. Members in ``now`` (the senders
        waiting for their acks) are written at once in any case.

        A batch committed together (and its acks) thus costs at most one socket write per
        recipient, not one per message per recipient; and each frame is framed once, not
        once per recipient.
        """
        queues: dict[Member, list[bytes]] = {}
        held: list[Member] = []
        for recipients, data, message in items:
            framed: bytes | None = None  # framed once, for all its recipients
            for member in recipients:
                if member.hold is None:
                    if framed is None:
                        framed = frame_text(data)
                    frames = queues.get(member)
                    if frames is None:
                        queues[member] = [framed]
                    else:
                        frames.append(framed)
                else:
                    member.hold.append(data, message)
                    held.append(member)
        limit = self.buffer_limit
        if self.window and self._in_window():
            # Their frames wait in their links; the limit is checked when they are sent.
            waiting = self._waiting
            for member, frames in queues.items():
                member.link.defer_framed(frames)
                waiting[member] = None
            for member in now:
                link = member.link
                link.flush()
                if link.buffered() > limit:
                    self.drop(member)
        else:
            for member, frames in queues.items():
                link = member.link
                link.write_framed(frames)
                if link.buffered() > limit:
                    self.drop(member)
        for member in held:
            self.check(member)

    def _in_window(self) -> bool:
        """Whether what is published now waits for a window's end (starting one if the
        last write was less than a window ago); False: write now, and a window starts."""
        if self._window_end is not None:
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._written >= self.window:
            self._written = now
            return False
        self._window_end = loop.call_at(self._written + self.window, self._end_window)
        return True

    def _end_window(self) -> None:
        """Send what waited, one write per member; drop those now over the limit."""
        self._window_end = None
        self._written = asyncio.get_running_loop().time()
        members, self._waiting = self._waiting, {}
        limit = self.buffer_limit
        for member in members:
            link = member.link
            link.flush()
            if link.buffered() > limit:
                self.drop(member)

    def check(self, member: Member) -> None:
        """Drop a member whose unsent live data passed the limit.

        While a member holds, only the hold counts: the catch-up's own bytes sitting in
        the socket buffer are paced by the session and are not the client's fault.
        """
        unsent = member.hold.size if member.hold is not None else member.link.buffered()
        if unsent > self.buffer_limit:
            self.drop(member)

    def drop(self, member: Member) -> None:
        """Close a member as too slow; its session leaves its rooms at once."""
        member.kick(
            CloseCode.POLICY, f"too slow: over {self.buffer_limit} bytes waiting to be sent"
        )
