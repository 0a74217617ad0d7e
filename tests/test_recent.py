"""The rooms' tails in memory (``chat_server/recent.py``): what a resume replays from them
must be exactly what the store would have given, at every boundary of the cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from chat_server.backends.sqlite import Store
from chat_server.messages import Committed, Draft, Scope, StoredMessage
from chat_server.recent import TAIL_OVERHEAD, RecentRooms, size_of
from tests.helpers import NO_LIMITS, peer, server
from tests.stores import db_on_both_stores  # noqa: F401 (db: SQLite and PostgreSQL)

ROOMS = ("a", "b", "c")


class Feed:
    """A real SQLite store whose commits go to a RecentRooms, as the server wires it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.recent: RecentRooms | None = None
        self.committed_ids: list[int] = []
        self.batch = asyncio.Event()

    def committed(self, results: Sequence[Committed]) -> None:
        fresh = [r.message for r in results if r.fresh]
        if self.recent is not None:
            self.recent.committed(fresh)
        self.committed_ids += [m.id for m in fresh]
        self.batch.set()

    def failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        raise AssertionError(f"commit failed: {error}")

    async def send(self, room: str | None, body: str, to: str | None = None) -> None:
        """Store one message (a DM when ``to``) and wait for its commit."""
        count = len(self.committed_ids)
        to = None if room is not None else to
        await self.store.submit(
            Draft(
                sender_key="sam",
                sender="sam",
                room=room,
                recipient_key=to,
                recipient=to,
                action=False,
                body=body,
                cid=f"c{count}-{body}",
            )
        )
        while len(self.committed_ids) == count:
            self.batch.clear()
            await self.batch.wait()


@asynccontextmanager
async def feed(tmp_path: Path) -> AsyncIterator[Feed]:
    store = await Store.open(tmp_path / "chat.db")
    fed = Feed(store)
    store.start(fed)
    try:
        yield fed
    finally:
        await store.close()


def make_recent(fed: Feed, **limits: int) -> RecentRooms:
    fed.recent = RecentRooms(fed.store, asyncio.Semaphore(4), watermark=fed.store.last_id, **limits)
    return fed.recent


async def from_store(store: Store, rooms: Sequence[str], after: int) -> list[int]:
    """The ids the store gives for these rooms after ``after``, oldest first."""
    ids: list[int] = []
    async for page in store.messages(Scope(rooms=tuple(rooms)), after=after):
        ids += [m.id for m in page]
    return sorted(ids)


def ids(messages: Sequence[StoredMessage] | None) -> list[int] | None:
    return None if messages is None else [m.id for m in messages]


async def test_tails_give_what_the_store_gives_from_every_point(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        for n in range(30):  # before the cache existed: read from the store once
            await fed.send(ROOMS[n % 3] if n % 4 else None, f"old{n}", to="ann")
        recent = make_recent(fed)
        for n in range(20):  # after: from the commit listener
            await fed.send(ROOMS[n % 2], f"new{n}")
        top = fed.committed_ids[-1]
        for rooms in (["a"], ["b", "c"], list(ROOMS)):
            for after in range(0, top + 2):
                await recent.load(rooms, after, cap=1000)
                got = recent.read(rooms, after, recent.watermark, cap=1000)
                assert ids(got) == await from_store(fed.store, rooms, after), (rooms, after)


async def test_direct_messages_never_enter_a_tail(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        await fed.send(None, "before", to="ann")
        recent = make_recent(fed)
        await recent.load(["a"], 0, cap=1000)
        await fed.send(None, "secret", to="ann")
        await fed.send("a", "public")
        got = recent.read(["a"], 0, recent.watermark, cap=1000)
        assert [m.body for m in got or []] == ["public"]
        assert recent.watermark == fed.committed_ids[-1]


async def test_a_trimmed_tail_refuses_what_it_no_longer_holds(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        recent = make_recent(fed, per_room=5)
        await recent.load(["a"], 0, cap=1000)
        for n in range(8):
            await fed.send("a", f"m{n}")
        sent = fed.committed_ids
        # The three oldest were trimmed: a replay from before them must not come from here
        # (it would miss them without a gap) ...
        assert recent.read(["a"], 0, recent.watermark, cap=1000) is None
        assert recent.read(["a"], sent[2] - 1, recent.watermark, cap=1000) is None
        # ... from just after the trimmed ones it is exact,
        assert ids(recent.read(["a"], sent[2], recent.watermark, cap=1000)) == sent[3:]
        # and when the replay is cut at the cap anyway, the newest five are enough.
        assert ids(recent.read(["a"], 0, recent.watermark, cap=5)) == sent[3:]
        assert ids(recent.read(["a"], 0, recent.watermark, cap=6)) is None
        # Loading again cannot extend a full tail: the store serves that replay.
        await recent.load(["a"], 0, cap=1000)
        assert recent.read(["a"], 0, recent.watermark, cap=1000) is None


async def test_a_tail_reaches_back_only_as_far_as_it_may_hold(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        for n in range(8):
            await fed.send("a", f"m{n}")
        sent = list(fed.committed_ids)
        recent = make_recent(fed, per_room=5)
        await recent.load(["a"], 0, cap=1000)
        assert recent.read(["a"], 0, recent.watermark, cap=1000) is None
        assert ids(recent.read(["a"], 0, recent.watermark, cap=5)) == sent[3:]
        assert ids(recent.read(["a"], sent[4], recent.watermark, cap=1000)) == sent[5:]


async def test_over_the_budget_the_least_recently_resumed_room_goes(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        for room in ROOMS:
            await fed.send(room, "x" * 100)
        one = size_of(StoredMessage(0, 0, "a", "s", "s", None, None, False, "x" * 100, "c"))
        recent = make_recent(fed, budget=2 * (one + TAIL_OVERHEAD))
        await recent.load(["a"], 0, cap=1000)
        await recent.load(["b"], 0, cap=1000)
        await recent.load(["a"], 0, cap=1000)  # a was resumed last: b goes when c comes
        await recent.load(["c"], 0, cap=1000)
        assert len(recent) == 2 and recent.size <= recent.budget
        assert recent.read(["b"], 0, recent.watermark, cap=1000) is None
        assert recent.read(["a"], 0, recent.watermark, cap=1000) is not None
        assert recent.read(["c"], 0, recent.watermark, cap=1000) is not None


async def test_empty_tails_count_against_the_budget(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        recent = make_recent(fed, budget=3 * TAIL_OVERHEAD)
        for n in range(10):  # rooms without messages: resumed into, never written to
            await recent.load([f"quiet{n}"], 0, cap=1000)
        assert len(recent) == 3 and recent.size == 3 * TAIL_OVERHEAD


class SlowStore:
    """A store whose reads wait for ``go``: commits happen while a tail is being loaded."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reading = asyncio.Event()
        self.go = asyncio.Event()

    async def messages(self, scope: Scope, **query: Any) -> AsyncGenerator[list[StoredMessage]]:
        pages = self.store.messages(scope, **query)
        self.reading.set()
        await self.go.wait()
        async for page in pages:
            yield page


async def test_a_read_that_a_trim_overtook_is_thrown_away(tmp_path: Path) -> None:
    async with feed(tmp_path) as fed:
        for n in range(6):
            await fed.send("a", f"old{n}")
        old = list(fed.committed_ids)
        slow = SlowStore(fed.store)
        recent = RecentRooms(slow, asyncio.Semaphore(4), watermark=fed.store.last_id, per_room=4)  # type: ignore[arg-type]
        fed.recent = recent
        loading = asyncio.create_task(recent.load(["a"], 0, cap=1000))
        await slow.reading.wait()
        for n in range(5):  # the tail fills and trims while the old ones are read
            await fed.send("a", f"new{n}")
        slow.go.set()
        await loading
        new = fed.committed_ids[len(old) :]
        # Joined, the old page would sit below a hole (new0 was trimmed): not used.
        for after in (0, *old):
            assert recent.read(["a"], after, recent.watermark, cap=1000) is None, after
        assert ids(recent.read(["a"], new[0], recent.watermark, cap=1000)) == new[1:]


# --- through the server: a resume from the tails is the resume from the store ---------------


async def resume_frames(db: Path | str, *, cached: bool, **config: Any) -> list[dict[str, Any]]:
    """alice misses room messages and DMs, then resumes: her catch-up's frames."""
    async with server(db, **NO_LIMITS, **config) as chat:
        if not cached:
            chat.ctx.recent = None
        async with peer(chat, "alice", rooms=["lobby", "dev"]) as alice:
            secret = alice.welcome["secret"]
            last = (await alice.say("seen"))["id"]
        async with peer(chat, "bob", rooms=["lobby", "dev", "other"]) as bob:
            for n in range(12):
                room = ("lobby", "dev", "other")[n % 3]
                await bob.say(f"{room} {n}", room=room)
                if n % 5 == 0:
                    await bob.say(f"dm {n}", to="alice")
        async with peer(chat, "carol", rooms=["dev"]) as carol:
            await carol.say("dm from carol", to="alice")
            await carol.say("carol in dev", room="dev")
        async with peer(chat, "alice", secret=secret, rooms=["lobby", "dev"], resume=last) as a:
            return [
                {k: v for k, v in f.items() if k not in ("ts", "cid")}
                for f in a.catchup
                if f["type"] in ("msg", "gap", "synced")
            ]


@pytest.mark.parametrize("cap", [1000, 5])
async def test_resume_from_the_tails_equals_resume_from_the_store(tmp_path: Path, cap: int) -> None:
    cached = await resume_frames(tmp_path / "cached.db", cached=True, resume_cap=cap)
    stored = await resume_frames(tmp_path / "stored.db", cached=False, resume_cap=cap)
    assert cached == stored
    bodies = [f.get("body") for f in cached if f["type"] == "msg"]
    assert "other 2" not in bodies  # a room alice is not in
    if cap == 5:
        assert cached[0]["type"] == "gap" and len(bodies) == 5
    else:
        assert "dm 0" in bodies and "dm from carol" in bodies and len(bodies) == 13


async def test_the_tails_are_used_on_one_server_only(db: Path | str) -> None:
    async with server(db) as chat:
        # In a cluster other replicas' commits arrive later: replays read the database.
        assert (chat.ctx.recent is None) == (chat.cluster is not None)
