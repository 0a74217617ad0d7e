"""The server's record types: a message on its way to the store, a stored one, and the
scope of a read."""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from chat_protocol.frames import Frame
from chat_server.encoding import msg_frame


def channel_of(room: str | None, sender_key: str, recipient_key: str | None) -> str:
    """The conversation a message belongs to: ``#room``, or ``@a@b`` for two nicks' DMs.

    Nicks cannot contain ``#`` or ``@``, so the two kinds never collide.
    """
    if room is not None:
        return "#" + room
    assert recipient_key is not None
    low, high = sorted((sender_key, recipient_key))
    return f"@{low}@{high}"


@dataclass(frozen=True, slots=True)
class Scope:
    """Which stored messages a read covers.

    ``rooms``: the messages of these rooms. ``with_key``: the direct messages between
    ``key`` and that nick. ``direct``: every direct message to or from ``key``. Direct
    messages are only ever read for ``key`` (the reader's own nick) and only those with
    an id above ``since``, the newest id when that nick was registered: a nick claimed
    afresh never sees what was sent to an earlier holder of the same name.
    """

    rooms: tuple[str, ...] = ()
    key: str = ""
    with_key: str | None = None
    direct: bool = False
    since: int = 0

    def channels(self) -> list[str]:
        """The channels read without the ``since`` floor (rooms)."""
        return [channel_of(room, "", None) for room in self.rooms]


@dataclass(frozen=True, slots=True)
class Draft:
    """A message accepted from a client and waiting for its commit.

    ``origin`` is the session that sent it, opaque to the store, so the server can
    acknowledge the sender once the row is durable.
    """

    sender_key: str
    sender: str
    room: str | None
    recipient_key: str | None
    recipient: str | None
    action: bool
    body: str
    cid: str
    origin: Any = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    ts: int  # milliseconds since the Unix epoch, server clock
    room: str | None
    sender_key: str
    sender: str
    recipient_key: str | None
    recipient: str | None
    action: bool
    body: str
    cid: str

    def frame(self) -> Frame:
        """The ``msg`` frame every recipient gets, the same bytes for all of them."""
        frame: Frame = {"type": "msg", "id": self.id, "ts": self.ts}
        if self.room is not None:
            frame["room"] = self.room
        else:
            frame["to"] = self.recipient
        frame["from"] = self.sender
        frame["body"] = self.body
        frame["action"] = self.action
        frame["cid"] = self.cid
        return frame


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of one draft: the row it became, and whether this draft wrote it.

    ``fresh`` is False for a retry whose client message id was already stored: nothing
    new was written and the original row is returned.
    """

    draft: Draft
    message: StoredMessage
    fresh: bool


class EncodedFrames:
    """The encoded ``msg`` frames of recent messages, by id, up to ``budget`` bytes.

    A stored message never changes, so neither do its frame's bytes. After a restart or a
    network blip thousands of clients resume at once and are replayed the same few
    hundred messages: each is encoded once here instead of once per client (the encoding
    was a third of a resume's CPU in the reconnect storm). Live messages are put in as
    they are fanned out, so a client that resumes right after them finds them too.
    """

    __slots__ = ("_frames", "budget", "size")

    def __init__(self, budget: int = 4 * 2**20) -> None:
        self._frames: OrderedDict[int, bytes] = OrderedDict()
        self.budget = budget
        self.size = 0

    def __call__(self, message: StoredMessage) -> bytes:
        data = self._frames.get(message.id)
        if data is None:
            data = msg_frame(message)
            self._frames[message.id] = data
            self.size += len(data)
            while self.size > self.budget:
                _, dropped = self._frames.popitem(last=False)
                self.size -= len(dropped)
        return data

    def __len__(self) -> int:
        return len(self._frames)
