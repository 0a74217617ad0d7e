"""Fan-out: who is online, who is in which room, and writing one frame to many of them.

A frame is encoded once and written to every recipient's socket synchronously with
``websockets.broadcast``: no task per recipient and no await, so a message reaches all
members of a room in the same event-loop step, in id order. Because broadcast has no
backpressure, the hub checks each recipient's outgoing buffer after writing and drops a
member whose buffer passed ``buffer_limit`` bytes: a stuck reader costs a bounded amount of
memory and never delays anybody else.

A member may be *holding*: while its session reads history or a replay from the store,
frames for it are kept in order in ``member.hold`` and written after the catch-up, so
nothing falls between the stored past and the live stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from chat_protocol import CloseCode
from chat_server.messages import StoredMessage

log = logging.getLogger(__name__)

#: A frame waiting in a hold: its bytes, and the stored message it carries, if any.
Held = tuple[bytes, StoredMessage | None]
#: One frame for some recipients: who, the encoded frame, the stored message it carries.
Delivery = tuple[Iterable["Member"], bytes, StoredMessage | None]


class Member(Protocol):
    connection: ServerConnection
    nick: str
    nick_key: str
    hold: list[Held] | None

    def kick(self, code: int, reason: str) -> None:
        """Close the member's connection in the background."""


class RemoteView(Protocol):
    """Who is online on the *other* replicas of a cluster (``chat_server.cluster``)."""

    def nicks(self, room: str | None) -> list[str]:
        """Nicks in ``room`` elsewhere; with None, every nick online elsewhere."""

    def counts(self) -> dict[str, int]:
        """Members per room elsewhere."""


class Hub:
    def __init__(self, buffer_limit: int) -> None:
        self.buffer_limit = buffer_limit
        self.online: dict[str, Member] = {}
        self.rooms: dict[str, dict[str, Member]] = {}
        #: In a cluster: the other replicas' members, so that who/rooms/joined see them.
        self.remote: RemoteView | None = None

    # --- membership ------------------------------------------------------------------

    def add(self, member: Member) -> None:
        self.online[member.nick_key] = member

    def remove(self, member: Member) -> list[str]:
        """Forget a member everywhere; returns the rooms it was in."""
        if self.online.get(member.nick_key) is member:
            del self.online[member.nick_key]
        left = self.rooms_of(member)
        for room in left:
            self.leave(member, room)
        return left

    def join(self, member: Member, room: str) -> None:
        self.rooms.setdefault(room, {})[member.nick_key] = member

    def is_member(self, member: Member, room: str) -> bool:
        return self.rooms.get(room, {}).get(member.nick_key) is member

    def leave(self, member: Member, room: str) -> None:
        if self.is_member(member, room):
            members = self.rooms[room]
            del members[member.nick_key]
            if not members:
                del self.rooms[room]

    def members(self, room: str) -> list[str]:
        return _merged((m.nick for m in self.rooms.get(room, {}).values()), self.remote, room)

    def online_nicks(self) -> list[str]:
        """Everybody online (cluster-wide in a cluster), sorted."""
        return _merged((m.nick for m in self.online.values()), self.remote, None)

    def member_counts(self) -> dict[str, int]:
        counts = {room: len(members) for room, members in self.rooms.items()}
        if self.remote is not None:
            for room, count in self.remote.counts().items():
                counts[room] = counts.get(room, 0) + count
        return counts

    def rooms_of(self, member: Member) -> list[str]:
        return [room for room in self.rooms if self.is_member(member, room)]

    # --- delivery --------------------------------------------------------------------

    def room_members(self, room: str) -> Iterable[Member]:
        return self.rooms.get(room, {}).values()

    def recipients(self, message: StoredMessage) -> list[Member]:
        """This process's members who get a stored message: its room, or the DM's two ends."""
        if message.room is not None:
            return list(self.room_members(message.room))
        keys = dict.fromkeys((message.sender_key, message.recipient_key))
        return [m for key in keys if key is not None and (m := self.online.get(key)) is not None]

    def publish(
        self, recipients: Iterable[Member], data: bytes, message: StoredMessage | None = None
    ) -> None:
        """Write one encoded frame to every recipient (or to its hold)."""
        self.publish_many([(recipients, data, message)])

    def publish_many(self, items: Iterable[Delivery]) -> None:
        """Write several frames, in order; each recipient gets all of its frames in one write.

        A batch committed together (and its acks) thus costs one socket write per
        recipient, not one per message per recipient.
        """
        queues: dict[Member, list[bytes]] = {}
        held: list[Member] = []
        for recipients, data, message in items:
            for member in recipients:
                if member.hold is None:
                    frames = queues.get(member)
                    if frames is None:
                        queues[member] = [data]
                    else:
                        frames.append(data)
                else:
                    member.hold.append((data, message))
                    held.append(member)
        limit = self.buffer_limit
        for member, frames in queues.items():
            connection = member.connection
            write_frames(connection, frames)
            transport = connection.transport
            # Cheap on the hot path: one C call on the transport.
            if transport is not None and transport.get_write_buffer_size() > limit:
                self.drop(member)
        for member in held:
            self.check(member)

    def check(self, member: Member) -> None:
        """Drop a member whose unsent data (written and held) passed the limit."""
        held = sum(len(data) for data, _ in member.hold) if member.hold else 0
        transport = member.connection.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() + held > self.buffer_limit:
            self.drop(member)

    def drop(self, member: Member) -> None:
        self.remove(member)
        member.kick(
            CloseCode.POLICY, f"too slow: over {self.buffer_limit} bytes waiting to be sent"
        )


def _merged(local: Iterable[str], remote: RemoteView | None, room: str | None) -> list[str]:
    nicks = {nick.lower(): nick for nick in local}
    if remote is not None:
        for nick in remote.nicks(room):
            nicks.setdefault(nick.lower(), nick)
    return sorted(nicks.values(), key=str.lower)


def write_frames(connection: ServerConnection, frames: list[bytes]) -> None:
    """Queue text frames on a connection and hand them to the socket in one write.

    What ``websockets.broadcast`` does for one frame, for several: each message is framed
    by the connection's Sans-I/O ``protocol``, then all the bytes go to the transport
    together (``Connection.send_data`` would write each frame separately: one system
    call per frame). Like broadcast, it skips a connection that is not open and never
    waits. (Broadcast also skips a connection in the middle of a fragmented send; this
    server never sends fragmented messages.)
    """
    if connection.protocol.state is not State.OPEN:
        return
    try:
        for data in frames:
            connection.protocol.send_text(data)
        chunks = connection.protocol.data_to_send()
        connection.transport.write(b"".join(chunks))
        if chunks and not chunks[-1] and connection.transport.can_write_eof():
            connection.transport.write_eof()  # the protocol asked to half-close
    except Exception:  # a broken connection: its handler will see the close
        log.debug("write to %s failed", connection.remote_address, exc_info=True)
