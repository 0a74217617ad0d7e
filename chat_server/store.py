"""SQLite persistence: the only module that holds SQL.

Two aiosqlite connections, each with its own thread: a *writer* used only by one writer
task, and a *reader* for history, replay and look-ups. In WAL mode readers never block
the writer and always see every committed row.

Writes are group-committed: the writer task takes everything queued since its last
commit (up to ``batch_max`` messages) and stores it with one multi-row INSERT, a single
atomic statement and a single commit; only then does it report the rows to the listener,
which fans them out and acknowledges their senders. Message ids are assigned by the
writer itself (it is the only writer of the file), so a batch needs no per-row round
trip, and a batch costs one hop to the database thread (measured: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import aiosqlite

from chat_server import metrics
from chat_server.messages import Committed, Draft, StoredMessage, channel_of

log = logging.getLogger(__name__)

T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

MIGRATIONS: tuple[str, ...] = (
    # 1: nicks, rooms, messages
    """
    CREATE TABLE nicks (
        nick_key    TEXT PRIMARY KEY,
        nick        TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        created_ts  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE rooms (
        name       TEXT PRIMARY KEY,
        created_ts INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        id            INTEGER PRIMARY KEY,
        ts            INTEGER NOT NULL,
        channel       TEXT NOT NULL,
        room          TEXT,
        sender_key    TEXT NOT NULL,
        sender        TEXT NOT NULL,
        recipient_key TEXT,
        recipient     TEXT,
        action        INTEGER NOT NULL,
        body          TEXT NOT NULL,
        cid           TEXT NOT NULL,
        CHECK ((room IS NULL) <> (recipient_key IS NULL))
    );
    CREATE UNIQUE INDEX messages_sender_cid ON messages (sender_key, cid);
    CREATE INDEX messages_channel ON messages (channel, id);
    CREATE INDEX messages_dm_recipient ON messages (recipient_key, id)
        WHERE recipient_key IS NOT NULL;
    CREATE INDEX messages_dm_sender ON messages (sender_key, id)
        WHERE recipient_key IS NOT NULL;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('probe', '0');
    """,
)

_COLUMNS = "id, ts, room, sender_key, sender, recipient_key, recipient, action, body, cid"
_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # channel + the columns above


class StoreUnavailable(Exception):
    """The database refused a write (disk full, read-only file, I/O error)."""


class CommitListener(Protocol):
    def committed(self, results: Sequence[Committed]) -> None: ...

    def failed(self, drafts: Sequence[Draft], error: Exception) -> None: ...


@dataclass(frozen=True, slots=True)
class NickClaim:
    """The outcome of claiming a nick: granted (with a new secret the first time) or not."""

    granted: bool
    nick: str  # as first registered, when granted
    new_secret: str | None = None


@dataclass(slots=True)
class _Op:
    """A write other than a message, run inside the next batch's transaction."""

    run: Callable[[aiosqlite.Connection], Awaitable[Any]]
    future: asyncio.Future[Any]


_STOP = object()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _hash_secret(secret: str) -> bytes:
    # Secrets are 192 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).digest()


def _message(row: sqlite3.Row | tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(
        id=row[0],
        ts=row[1],
        room=row[2],
        sender_key=row[3],
        sender=row[4],
        recipient_key=row[5],
        recipient=row[6],
        action=bool(row[7]),
        body=row[8],
        cid=row[9],
    )


async def _connect(path: Path, synchronous: Synchronous) -> aiosqlite.Connection:
    # isolation_level=None: no implicit transactions; the writer says BEGIN/COMMIT itself.
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await db.execute("PRAGMA busy_timeout = 5000")
    await db.execute("PRAGMA foreign_keys = ON")
    return db


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise RuntimeError(f"database schema {version} is newer than this server knows")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        log.info("migrating database schema to version %d", number)
        await db.executescript(
            f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;"
        )


class Store:
    """Durable history, nick registrations and the group-committing writer."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        last_id: int,
        *,
        batch_max: int,
        queue_max: int,
        batch_wait: float = 0.0,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._last_id = last_id
        # SQLite allows 32766 bound parameters per statement; a row takes 11.
        self._batch_max = max(1, min(batch_max, 2000))
        self._batch_wait = batch_wait
        self._queue: asyncio.Queue[Draft | _Op | object] = asyncio.Queue(queue_max)
        self._task: asyncio.Task[None] | None = None
        self._listener: CommitListener | None = None
        self._known_rooms: set[str] = set()
        #: Committed batches and the messages in them, for the shutdown log line.
        self.batches = 0
        self.batched = 0
        self.writable = True
        self.last_error: str | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        batch_max: int = 512,
        queue_max: int = 10_000,
        batch_wait: float = 0.0,
    ) -> Store:
        writer = await _connect(path, synchronous)
        try:
            await _migrate(writer)
            async with writer.execute("SELECT COALESCE(MAX(id), 0) FROM messages") as cursor:
                row = await cursor.fetchone()
            reader = await _connect(path, synchronous)
        except BaseException:
            await writer.close()
            raise
        last_id = int(row[0]) if row else 0
        return cls(
            writer, reader, last_id, batch_max=batch_max, queue_max=queue_max, batch_wait=batch_wait
        )

    @property
    def last_id(self) -> int:
        """The id of the newest committed message (0 when there is none)."""
        return self._last_id

    def start(self, listener: CommitListener) -> None:
        self._listener = listener
        self._task = asyncio.create_task(self._run_writer(), name="store-writer")

    async def close(self) -> None:
        """Commit everything queued, stop the writer, close both connections."""
        if self._task is not None:
            await self._queue.put(_STOP)
            await self._task
            self._task = None
        await self._reader.close()
        await self._writer.close()

    # --- writes --------------------------------------------------------------------

    async def submit(self, draft: Draft) -> None:
        """Queue a message; waits only while the queue is full (backpressure)."""
        await self._queue.put(draft)

    async def _call(self, run: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Op(run, future))
        return await future

    async def claim_nick(self, nick: str, key: str, secret: str | None) -> NickClaim:
        """Register ``nick`` on first use, or check ``secret`` against its registration."""

        async def claim(db: aiosqlite.Connection) -> NickClaim:
            async with db.execute(
                "SELECT nick, secret_hash FROM nicks WHERE nick_key = ?", (key,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                new_secret = secrets.token_urlsafe(24)
                await db.execute(
                    "INSERT INTO nicks (nick_key, nick, secret_hash, created_ts)"
                    " VALUES (?, ?, ?, ?)",
                    (key, nick, _hash_secret(new_secret), _now_ms()),
                )
                return NickClaim(granted=True, nick=nick, new_secret=new_secret)
            granted = secret is not None and hmac.compare_digest(row[1], _hash_secret(secret))
            return NickClaim(granted=granted, nick=row[0])

        return await self._call(claim)

    async def ensure_rooms(self, rooms: Sequence[str]) -> None:
        """Record rooms in the room list; known ones cost no write."""
        rooms = [room for room in rooms if room not in self._known_rooms]
        if not rooms:
            return

        async def insert(db: aiosqlite.Connection) -> None:
            now = _now_ms()
            await db.executemany(
                "INSERT OR IGNORE INTO rooms (name, created_ts) VALUES (?, ?)",
                [(room, now) for room in rooms],
            )

        await self._call(insert)
        self._known_rooms.update(rooms)

    async def probe(self) -> None:
        """Commit a tiny write; raises StoreUnavailable when the database cannot."""

        async def touch(db: aiosqlite.Connection) -> None:
            await db.execute("UPDATE meta SET value = ? WHERE key = 'probe'", (str(_now_ms()),))

        await self._call(touch)

    async def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Draft | _Op] = []
            item = await self._queue.get()
            if self._batch_wait and item is not _STOP and self._queue.qsize() < self._batch_max:
                # Linger a moment so that a batch, and its fan-out, carries more messages.
                await asyncio.sleep(self._batch_wait)
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    assert isinstance(item, Draft | _Op)
                    batch.append(item)
                if len(batch) >= self._batch_max or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[Draft | _Op]) -> None:
        drafts = [item for item in batch if isinstance(item, Draft)]
        ops = [item for item in batch if isinstance(item, _Op)]
        if drafts:
            await self._write_messages(drafts)
        for op in ops:
            await self._run_op(op)

    async def _write_messages(self, drafts: list[Draft]) -> None:
        """Store a batch in one statement: one thread hop and one commit in the common case.

        The rows go in as one multi-row ``INSERT OR IGNORE``, atomic on its own in
        autocommit mode. A row is ignored only when its (sender, cid) is already stored, a
        retry; then, and only then, a second query finds the original rows.
        """
        db = self._writer
        results: list[Committed] = []
        rows: list[Any] = []
        batch: dict[tuple[str, str], StoredMessage] = {}
        next_id = self._last_id
        ts = _now_ms()
        for draft in drafts:
            key = (draft.sender_key, draft.cid)
            if key in batch:  # the same message twice in one batch
                results.append(Committed(draft, batch[key], fresh=False))
                continue
            next_id += 1
            message = StoredMessage(
                id=next_id,
                ts=ts,
                room=draft.room,
                sender_key=draft.sender_key,
                sender=draft.sender,
                recipient_key=draft.recipient_key,
                recipient=draft.recipient,
                action=draft.action,
                body=draft.body,
                cid=draft.cid,
            )
            batch[key] = message
            results.append(Committed(draft, message, fresh=True))
            rows.extend(_row(message))
        count = len(batch)
        marks = ", ".join([_ROW_MARKS] * count)
        started = time.perf_counter()
        try:
            before = db.total_changes
            await db.execute(
                f"INSERT OR IGNORE INTO messages (channel, {_COLUMNS}) VALUES {marks}", rows
            )
            if db.total_changes - before != count:
                results = await self._resolve_retries(results)
        except sqlite3.Error as exc:
            self._set_writable(False, f"{type(exc).__name__}: {exc}")
            if self._listener is not None:
                self._listener.failed(drafts, StoreUnavailable(str(exc)))
            return
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        self._last_id = next_id
        self.batches += 1
        self.batched += len(results)
        self._set_writable(True, None)
        if self._listener is not None:
            self._listener.committed(results)

    async def _resolve_retries(self, results: list[Committed]) -> list[Committed]:
        """Some rows were ignored as already stored: answer those with the stored rows."""
        stored = await self._existing([r.draft for r in results])
        resolved = []
        for result in results:
            original = stored[(result.draft.sender_key, result.draft.cid)]
            fresh = result.fresh and original.id == result.message.id
            resolved.append(Committed(result.draft, original, fresh))
        return resolved

    async def _run_op(self, op: _Op) -> None:
        db = self._writer
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                value = await op.run(db)
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._set_writable(False, f"{type(exc).__name__}: {exc}")
            if not op.future.done():
                op.future.set_exception(StoreUnavailable(str(exc)))
            return
        self._set_writable(True, None)
        if not op.future.done():
            op.future.set_result(value)

    def _set_writable(self, writable: bool, error: str | None) -> None:
        if writable != self.writable:
            if writable:
                log.warning("database writable again")
            else:
                log.error("database not writable: %s", error)
        self.writable = writable
        self.last_error = error

    async def _existing(self, drafts: Sequence[Draft]) -> dict[tuple[str, str], StoredMessage]:
        """Messages already stored under the drafts' (sender, client id) keys."""
        if not drafts:
            return {}
        keys = list({(d.sender_key, d.cid) for d in drafts})
        found: dict[tuple[str, str], StoredMessage] = {}
        # Row values: SQLite looks each pair up in the unique index.
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            values = ", ".join("(?, ?)" for _ in chunk)
            params = [part for key in chunk for part in key]
            sql = f"SELECT {_COLUMNS} FROM messages WHERE (sender_key, cid) IN (VALUES {values})"
            async with self._writer.execute(sql, params) as cursor:
                for row in await cursor.fetchall():
                    message = _message(row)
                    found[(message.sender_key, message.cid)] = message
        return found

    # --- reads ---------------------------------------------------------------------

    async def _select(self, sql: str, params: Iterable[Any]) -> list[StoredMessage]:
        rows = await self._reader.execute_fetchall(sql, tuple(params))
        return [_message(row) for row in rows]

    async def channel_history(
        self, channel: str, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        """The newest ``limit`` messages of a channel older than ``before``, oldest first.

        The flag says whether older messages remain.
        """
        rows = await self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE channel = ? AND id < ? "
            "ORDER BY id DESC LIMIT ?",
            (channel, before if before is not None else 2**63 - 1, limit + 1),
        )
        return rows[:limit][::-1], len(rows) > limit

    async def room_history(
        self, room: str, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        return await self.channel_history(channel_of(room, "", None), before, limit)

    async def dm_history(
        self, key: str, other_key: str, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        return await self.channel_history(channel_of(None, key, other_key), before, limit)

    async def recent_dms(self, key: str, limit: int) -> tuple[list[StoredMessage], bool]:
        """The newest direct messages to or from ``key``, oldest first."""
        rows = await self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE id IN ("
            " SELECT id FROM messages WHERE recipient_key = ? AND recipient_key IS NOT NULL"
            " UNION ALL"
            " SELECT id FROM messages WHERE sender_key = ? AND recipient_key IS NOT NULL"
            ") ORDER BY id DESC LIMIT ?",
            (key, key, limit + 1),
        )
        return rows[:limit][::-1], len(rows) > limit

    async def replay(
        self, after: int, rooms: Sequence[str], key: str, cap: int
    ) -> tuple[list[StoredMessage], bool]:
        """Messages after ``after`` in ``rooms`` and in ``key``'s DMs, oldest first.

        At most the newest ``cap``; the flag says that older ones were left out.
        """
        channels = [channel_of(room, "", None) for room in rooms]
        marks = ", ".join("?" for _ in channels) or "NULL"
        rows = await self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE id > ? AND ("
            f" channel IN ({marks})"
            " OR (recipient_key IS NOT NULL AND (recipient_key = ? OR sender_key = ?))"
            ") ORDER BY id DESC LIMIT ?",
            (after, *channels, key, key, cap + 1),
        )
        return rows[:cap][::-1], len(rows) > cap

    async def registered_nick(self, key: str) -> str | None:
        """The registered spelling of a nick, or None if nobody ever claimed it."""
        rows = await self._reader.execute_fetchall(
            "SELECT nick FROM nicks WHERE nick_key = ?", (key,)
        )
        for row in rows:
            return str(row[0])
        return None

    async def room_names(self) -> list[str]:
        rows = await self._reader.execute_fetchall("SELECT name FROM rooms ORDER BY name")
        return [str(row[0]) for row in rows]


def _row(message: StoredMessage) -> tuple[Any, ...]:
    return (
        channel_of(message.room, message.sender_key, message.recipient_key),
        message.id,
        message.ts,
        message.room,
        message.sender_key,
        message.sender,
        message.recipient_key,
        message.recipient,
        int(message.action),
        message.body,
        message.cid,
    )
