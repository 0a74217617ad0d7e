"""The newest messages of each room in memory, so that a ``resume`` is replayed without SQL.

After a restart or a network blip thousands of clients resume at once, and the clients
of one room all ask for the same few dozen messages. Reading them from the store for
every client cost three queries (three hops to the database thread) and a
``StoredMessage`` per row per client; here each room's tail is read once and shared.

**Correct by construction, on one server only.** A room's :class:`Tail` holds *every*
message of the room with ``floor < id <= watermark``, oldest first, where ``watermark``
is the newest id the store has reported committed. That stays true because

* new messages come from the store's commit listener, in id order, each batch in the
  same event-loop step as its fan-out (``ChatServer.committed``); the watermark
  advances with every batch, whatever rooms it touched;
* a tail only grows downwards by reading ``after < id <= floor`` from the store: with
  SQLite ids are given in commit order by the one writer, so every id up to the
  watermark is committed and nothing below it can appear later;
* a tail that was trimmed or evicted while such a read waited throws the read away.

In a cluster (PostgreSQL) other replicas' commits arrive later, through the database's
notifications, so "everything up to the watermark" would need more care: there the
server does not use this cache and replays from the store as before.

**Bounded.** At most ``per_room`` messages per room, and all tails together at most
``budget`` bytes (estimated per message from its text, plus a little per room, so that
the number of rooms is bounded too); past the budget the least recently resumed rooms
are forgotten. Only room messages are kept: direct messages are
always read from the store, for their owner only.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from heapq import merge

from chat_server.backends.base import ChatStore
from chat_server.messages import Scope, StoredMessage

#: Most messages kept per room (a replay of more is read from the store).
PER_ROOM = 256
#: Most bytes (estimated) of all rooms' tails together.
BUDGET = 16 * 2**20
#: The estimated size of a kept message besides its body: the object, its other strings.
OVERHEAD = 400
#: The estimated size of a room's tail itself, so that empty tails count too.
TAIL_OVERHEAD = 300


def size_of(message: StoredMessage) -> int:
    """An estimate of a kept message's memory (a non-ASCII body may take 4 bytes a char)."""
    body = message.body
    return OVERHEAD + (len(body) if body.isascii() else 4 * len(body))


class Tail:
    """One room's newest messages: all of them with ``floor < id <= watermark``."""

    __slots__ = ("floor", "ids", "lock", "messages", "size")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.messages: list[StoredMessage] = []
        self.ids: list[int] = []
        self.size = TAIL_OVERHEAD
        self.lock: asyncio.Lock | None = None

    def covers(self, after: int, cap: int) -> bool:
        """Whether this tail holds everything a replay after ``after`` (of at most ``cap``
        messages) takes from this room."""
        return self.floor <= after or len(self.ids) - bisect_right(self.ids, after) >= cap


class RecentRooms:
    """Every room's tail, least recently resumed first."""

    def __init__(
        self,
        store: ChatStore,
        reads: asyncio.Semaphore,
        *,
        watermark: int,
        per_room: int = PER_ROOM,
        budget: int = BUDGET,
    ) -> None:
        self._store = store
        self._reads = reads
        self._tails: OrderedDict[str, Tail] = OrderedDict()
        #: The newest id the store has reported committed (or found at start).
        self.watermark = watermark
        self.per_room = per_room
        self.budget = budget
        self.size = 0

    def __len__(self) -> int:
        return len(self._tails)

    def committed(self, messages: Iterable[StoredMessage]) -> None:
        """New messages, in id order (the store's commit listener)."""
        tails = self._tails
        for message in messages:
            if message.id <= self.watermark:
                continue  # not new: a retry's original row
            self.watermark = message.id
            tail = tails.get(message.room) if message.room is not None else None
            if tail is not None:
                tail.messages.append(message)
                tail.ids.append(message.id)
                added = size_of(message)
                tail.size += added
                self.size += added
                if len(tail.ids) > self.per_room:
                    self._trim(tail, len(tail.ids) - self.per_room)
        self._evict()

    async def load(self, rooms: Sequence[str], after: int, cap: int) -> None:
        """Extend these rooms' tails back to ``after`` where they fit, reading the store.

        Afterwards :meth:`read` may still say no (a tail could not hold the replay, or was
        dropped meanwhile): the caller then reads the store itself.
        """
        for room in rooms:
            tail = self._tails.get(room)
            if tail is None:
                # Nothing is known below the watermark yet; everything above will come.
                tail = self._tails[room] = Tail(self.watermark)
                self.size += tail.size
            self._tails.move_to_end(room)
            if tail.covers(after, cap):
                continue
            if tail.lock is None:
                tail.lock = asyncio.Lock()
            async with tail.lock:  # one read per room, the others wait and find it there
                if self._tails.get(room) is tail and not tail.covers(after, cap):
                    await self._extend(room, tail, after)
        self._evict()

    async def _extend(self, room: str, tail: Tail, after: int) -> None:
        want = self.per_room - len(tail.ids)
        if want <= 0:
            return
        floor = tail.floor
        older: list[StoredMessage] = []
        pages = self._store.messages(Scope(rooms=(room,)), after=after, before=floor + 1, page=want)
        try:
            async with self._reads:
                async for page in pages:
                    older.extend(page)
                    if len(older) >= want:
                        break
        finally:
            await pages.aclose()
        if self._tails.get(room) is not tail or tail.floor != floor:
            return  # evicted or trimmed meanwhile: what was read may no longer join up
        older = older[:want]
        older.reverse()
        tail.floor = older[0].id - 1 if len(older) == want else after
        tail.messages[:0] = older
        tail.ids[:0] = [message.id for message in older]
        added = sum(size_of(message) for message in older)
        tail.size += added
        self.size += added

    def read(
        self, rooms: Sequence[str], after: int, bound: int, cap: int
    ) -> list[StoredMessage] | None:
        """The rooms' messages with ``after < id <= bound``, oldest first; None when a
        tail does not hold them all (not loaded, too short, dropped)."""
        parts: list[list[StoredMessage]] = []
        for room in rooms:
            tail = self._tails.get(room)
            if tail is None:
                return None
            low = bisect_right(tail.ids, after)
            high = bisect_right(tail.ids, bound)
            if tail.floor > after and high - low < cap:
                return None  # older ones that the replay would take are not here
            if high > low:
                parts.append(tail.messages[low:high])
        if len(parts) == 1:
            return parts[0]
        return list(merge(*parts, key=_id))

    def _trim(self, tail: Tail, count: int) -> None:
        dropped = tail.messages[:count]
        tail.floor = dropped[-1].id
        del tail.messages[:count]
        del tail.ids[:count]
        removed = sum(size_of(message) for message in dropped)
        tail.size -= removed
        self.size -= removed

    def _evict(self) -> None:
        """Forget the least recently resumed rooms until the tails fit the budget (a
        replay whose tail went meanwhile reads the store instead)."""
        tails = self._tails
        while self.size > self.budget and tails:
            _, tail = tails.popitem(last=False)
            self.size -= tail.size


def _id(message: StoredMessage) -> int:
    return message.id
