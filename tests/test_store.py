"""The store's writer on a real SQLite file: what it commits together, and when it answers;
and the cache of encoded message frames that catch-ups read through."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import pytest

from chat_protocol import encode
from chat_server.backends.base import ClaimStatus, StoreFailed, StoreUnavailable
from chat_server.backends.sqlite import Store
from chat_server.messages import Committed, Draft, EncodedFrames, StoredMessage


class Listener:
    def committed(self, results: Sequence[Committed]) -> None:
        pass

    def failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        pass


@asynccontextmanager
async def store(db: Path) -> AsyncIterator[tuple[Store, list[str]]]:
    """A started store, and every statement its writer connection runs."""
    opened = await Store.open(db, synchronous="FULL")
    statements: list[str] = []
    await opened._writer.set_trace_callback(statements.append)
    opened.start(Listener())
    try:
        yield opened, statements
    finally:
        await opened.close()


def nick_row(db: Path, key: str) -> tuple[object, ...] | None:
    """Read through another connection, as a process starting after a crash would."""
    with sqlite3.connect(db) as conn:
        row: tuple[object, ...] | None = conn.execute(
            "SELECT nick FROM nicks WHERE nick_key = ?", (key,)
        ).fetchone()
        return row


async def test_registrations_at_once_share_commits_and_are_durable_when_answered(
    db: Path,
) -> None:
    async with store(db) as (st, statements):
        missing: list[str] = []

        async def register(n: int) -> None:
            claim = await st.claim_nick(
                f"n{n}", f"n{n}", None, online=False, may_register=True, claim_ttl=3600
            )
            assert claim.status is ClaimStatus.REGISTERED
            if nick_row(db, f"n{n}") is None:  # answered: it must be on disk already
                missing.append(f"n{n}")

        await asyncio.gather(*(register(n) for n in range(300)))
        commits = sum(1 for s in statements if s.strip().upper() == "COMMIT")
        assert missing == []
        # One commit (one fsync) per writer batch, not one per registration.
        assert commits <= 30, f"{commits} commits for 300 registrations"


async def test_a_failing_operation_is_undone_alone(db: Path) -> None:
    async with store(db) as (st, _):

        async def buggy(conn: aiosqlite.Connection) -> None:
            await conn.execute("INSERT INTO rooms (name, created_ts) VALUES ('half-done', 0)")
            raise RuntimeError("a bug in one operation")

        async def bad_sql(conn: aiosqlite.Connection) -> None:
            await conn.execute("INSERT INTO no_such_table VALUES (1)")

        def claim(nick: str) -> asyncio.Future[object]:
            return asyncio.ensure_future(
                st.claim_nick(nick, nick, None, online=False, may_register=True, claim_ttl=3600)
            )

        first = claim("before")
        failing = asyncio.ensure_future(st._call("buggy", buggy))
        refused = asyncio.ensure_future(st._call("bad_sql", bad_sql))
        second = claim("after")
        with pytest.raises(StoreFailed):
            await failing
        with pytest.raises(StoreUnavailable):
            await refused
        await asyncio.gather(first, second)
        assert nick_row(db, "before") is not None and nick_row(db, "after") is not None
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT name FROM rooms WHERE name = 'half-done'").fetchall() == []
        await st.probe()  # and the writer goes on


def stored(n: int, body: str = "hello") -> StoredMessage:
    return StoredMessage(n, 1000 + n, "lobby", "al", "Al", None, None, False, body, f"c{n}")


def test_encoded_frames_are_the_frames_and_stay_within_their_budget() -> None:
    """The replay's cache of encoded ``msg`` frames gives the same bytes as encoding, and
    never holds more than its byte budget (a storm of large messages must not grow it)."""
    frames = EncodedFrames(budget=10_000)
    big = "x" * 1000
    for n in range(1, 200):
        message = stored(n, big)
        assert frames(message) == encode(message.frame())
        assert frames.size <= 10_000
    assert 0 < len(frames) < 10
    recent = stored(199, big)
    assert frames(recent) is frames(recent)  # the newest are kept, and not encoded again
