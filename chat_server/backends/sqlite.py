"""SQLite persistence: the embedded store, one server process per database file.

The public interface (``backends/base.py``), which the PostgreSQL store implements too:

* life: ``await Store.open(path, ...)``, ``start(listener)``, ``await close()`` (commits
  what is queued first); ``epoch`` (a string that changes when the database is created
  anew), ``last_id``, ``writable`` and ``last_error`` (for ``/healthz``).
* writes, all through one writer task, in the order they were queued:
  ``submit(draft)`` (a message; its outcome goes to the listener's ``committed`` or
  ``failed``), ``claim_nick(...)``, ``create_rooms(rooms)``, ``probe()``.
* reads, on a second connection that never blocks the writer: ``messages(scope, ...)``
  (pages of stored messages, newest or oldest first, never a whole history at once),
  ``missing_rooms(rooms)``, ``room_page(after, limit)``, ``registered_nick(key)``.

Every call fails with :class:`StoreUnavailable` when the database refuses (disk full,
read-only file, I/O error, locked too long) and with :class:`StoreFailed` on anything
else (a bug). Neither ever stops the writer: it fails that one operation, logs it with
its traceback, and goes on with the next.

Two aiosqlite connections, each with its own thread: a *writer* used only by the writer
task, and a *reader* for history, replay and look-ups. In WAL mode readers never block
the writer and always see every committed row.

Writes are group-committed: the writer task takes everything queued since its last
commit (up to ``batch_max`` messages) and stores it with one multi-row INSERT, a single
atomic statement and a single commit; only then does it report the rows to the listener,
which fans them out and acknowledges their senders. Message ids are assigned by the
writer itself (it is the only writer of the file), so a batch needs no per-row round
trip, and a batch costs one hop to the database thread (measured: docs/benchmarks.md).
The other operations of a batch share one transaction too, each in its own savepoint.
A nick claim that can change nothing (a confirmed registration) is answered by a read
and never queues for the writer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from chat_protocol.limits import MIN_PROPOSED_SECRET_CHARS
from chat_server import metrics
from chat_server.backends.base import (
    MAX_PAGE,
    ClaimStatus,
    CommitListener,
    NickClaim,
    StoreFailed,
    StoreUnavailable,
)
from chat_server.messages import Committed, Draft, Scope, StoredMessage, channel_of

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
    # 2: the database's epoch; registrations the client has not yet confirmed by presenting
    # the secret again (they may expire); the newest message id when a nick was registered
    # (its holder reads direct messages after it only). Existing nicks count as confirmed.
    """
    INSERT INTO meta (key, value) VALUES ('epoch', lower(hex(randomblob(8))));
    ALTER TABLE nicks ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE nicks ADD COLUMN since_id INTEGER NOT NULL DEFAULT 0;
    """,
)

_COLUMNS = "id, ts, room, sender_key, sender, recipient_key, recipient, action, body, cid"
#: When an unconfirmed registration expires and the nick is registered afresh, the cids of
#: the messages sent under it are replaced by ``~<id>`` (no client can send a ``~``):
#: cids are unique per holder, so the next holder's ``c1`` must be a new message, not a
#: retry answered with the old holder's id. Its messages were sent after its ``since_id``.
RETIRE_CIDS = "UPDATE messages SET cid = '~' || id WHERE sender_key = ? AND id > ?"
_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # channel + the columns above
_NO_ID = 2**63 - 1


@dataclass(slots=True)
class _Op:
    """A write other than a message, run inside its own transaction."""

    run: Callable[[aiosqlite.Connection], Awaitable[Any]]
    future: asyncio.Future[Any]
    name: str


_STOP = object()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _hash_secret(secret: str) -> bytes:
    # Secrets carry at least 128 random bits, so a fast hash is enough.
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


def _scope_sql(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The WHERE condition (besides the id range) for a scope, with its parameters."""
    parts: list[str] = []
    params: dict[str, Any] = {"key": scope.key, "since": scope.since}
    channels = scope.channels()
    if scope.with_key is not None:
        channels_dm = channel_of(None, scope.key, scope.with_key)
        parts.append("(channel = :pair AND id > :since)")
        params["pair"] = channels_dm
    if channels:
        marks = ", ".join(f":c{n}" for n in range(len(channels)))
        parts.append(f"channel IN ({marks})")
        params.update({f"c{n}": channel for n, channel in enumerate(channels)})
    if scope.direct:
        # Two indexed look-ups instead of an OR that SQLite would answer with a scan.
        parts.append(
            "id IN (SELECT id FROM messages WHERE recipient_key = :key"
            " AND id > :low AND id < :high AND id > :since"
            " UNION ALL SELECT id FROM messages WHERE sender_key = :key"
            " AND recipient_key IS NOT NULL AND id > :low AND id < :high AND id > :since)"
        )
    return " OR ".join(parts) or "0", params


class Store:
    """Durable history, nick registrations and the group-committing writer."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        last_id: int,
        epoch: str,
        *,
        batch_max: int,
        queue_max: int,
        batch_wait: float = 0.0,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._last_id = last_id
        self.epoch = epoch
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
            last_id = await _scalar(writer, "SELECT COALESCE(MAX(id), 0) FROM messages")
            epoch = await _scalar(writer, "SELECT value FROM meta WHERE key = 'epoch'")
            reader = await _connect(path, synchronous)
        except BaseException:
            await writer.close()
            raise
        return cls(
            writer,
            reader,
            int(last_id),
            str(epoch),
            batch_max=batch_max,
            queue_max=queue_max,
            batch_wait=batch_wait,
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

    async def _call(self, name: str, run: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Op(run, future, name))
        return await future

    async def claim_nick(
        self,
        nick: str,
        key: str,
        secret: str | None,
        *,
        online: bool,
        may_register: bool,
        claim_ttl: float,
    ) -> NickClaim:
        """Register ``nick``, or check ``secret`` against its registration.

        An unregistered nick is registered with ``secret`` when one is proposed (at least
        ``MIN_PROPOSED_SECRET_CHARS``), else with a new secret returned in the claim; such a
        registration stays *unconfirmed* until its secret is presented again, and an
        unconfirmed one older than ``claim_ttl`` seconds may be registered afresh unless
        the nick is ``online``. ``may_register`` False refuses any registration
        (a quota), without looking at anything else.
        """

        # Most claims are a client coming back with its secret: a read answers those, with
        # no transaction in the writer's queue. Anything that may write goes to the writer.
        rows = await self._reader.execute_fetchall(
            "SELECT nick, secret_hash, confirmed, created_ts, since_id FROM nicks"
            " WHERE nick_key = ?",
            (key,),
        )
        for registered, hashed, confirmed, _, since in rows:
            if confirmed:  # a confirmed registration never changes: nothing to write
                if secret is not None and hmac.compare_digest(hashed, _hash_secret(secret)):
                    return NickClaim(ClaimStatus.GRANTED, registered, since=int(since))
                return NickClaim(ClaimStatus.TAKEN, registered)

        async def claim(db: aiosqlite.Connection) -> NickClaim:
            async with db.execute(
                "SELECT nick, secret_hash, confirmed, created_ts, since_id FROM nicks"
                " WHERE nick_key = ?",
                (key,),
            ) as cursor:
                row = await cursor.fetchone()
            now = _now_ms()
            if row is not None:
                matches = secret is not None and hmac.compare_digest(row[1], _hash_secret(secret))
                if matches:
                    if not row[2]:
                        await db.execute(
                            "UPDATE nicks SET confirmed = 1 WHERE nick_key = ?", (key,)
                        )
                    since = await _scalar(
                        db, "SELECT since_id FROM nicks WHERE nick_key = ?", (key,)
                    )
                    return NickClaim(ClaimStatus.GRANTED, row[0], since=int(since))
                expired = not row[2] and not online and now - row[3] >= claim_ttl * 1000
                if not expired:
                    return NickClaim(ClaimStatus.TAKEN, row[0])
            if not may_register:
                return NickClaim(ClaimStatus.NOT_ALLOWED, nick)
            if secret is not None and len(secret) < MIN_PROPOSED_SECRET_CHARS:
                return NickClaim(ClaimStatus.WEAK_SECRET, nick)
            new_secret = secrets.token_urlsafe(24) if secret is None else None
            chosen = secret if secret is not None else new_secret
            assert chosen is not None
            since = self._last_id
            if row is not None:  # an expired registration: its messages' cids go with it
                await db.execute(RETIRE_CIDS, (key, row[4]))
            await db.execute(
                "INSERT OR REPLACE INTO nicks"
                " (nick_key, nick, secret_hash, created_ts, confirmed, since_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, nick, _hash_secret(chosen), now, int(secret is not None), since),
            )
            return NickClaim(ClaimStatus.REGISTERED, nick, new_secret, since)

        return await self._call("claim_nick", claim)

    async def create_rooms(self, rooms: Sequence[str]) -> None:
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

        await self._call("create_rooms", insert)
        self._known_rooms.update(rooms)

    async def probe(self) -> None:
        """Commit a tiny write; raises StoreUnavailable when the database cannot."""

        async def touch(db: aiosqlite.Connection) -> None:
            await db.execute("UPDATE meta SET value = ? WHERE key = 'probe'", (str(_now_ms()),))

        await self._call("probe", touch)

    # --- the writer task -------------------------------------------------------------

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
                try:
                    await self._write(batch)
                except Exception as exc:  # the class of bug that once stopped every write
                    log.exception("the writer failed on a batch; failing it and going on")
                    self._fail(batch, StoreFailed(f"{type(exc).__name__}: {exc}"))

    async def _write(self, batch: list[Draft | _Op]) -> None:
        drafts = [item for item in batch if isinstance(item, Draft)]
        if drafts:
            await self._write_messages(drafts)
        ops = [item for item in batch if isinstance(item, _Op)]
        if ops:
            await self._run_ops(ops)

    def _fail(self, batch: Sequence[Draft | _Op], error: Exception) -> None:
        drafts = [item for item in batch if isinstance(item, Draft)]
        if drafts:
            self._notify_failed(drafts, error)
        for item in batch:
            if isinstance(item, _Op) and not item.future.done():
                item.future.set_exception(error)

    def _notify_failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        if self._listener is not None:
            try:
                self._listener.failed(drafts, error)
            except Exception:
                log.exception("the commit listener failed on a failed batch")

    async def _write_messages(self, drafts: list[Draft]) -> None:
        """Store a batch in one statement: one thread hop and one commit in the common case.

        The rows go in as one multi-row INSERT, atomic on its own in autocommit mode. A row
        is skipped only when its (sender, cid) is already stored, a retry; then, and only
        then, a second query finds the original rows. An id that is somehow taken already
        fails the whole statement instead of being skipped.
        """
        db = self._writer
        results: list[Committed] = []
        rows: list[Any] = []
        batch: dict[tuple[str, str], StoredMessage] = {}
        next_id = self._last_id
        try:
            ts = _now_ms()
            for draft in drafts:
                sender_key, cid, room = draft.sender_key, draft.cid, draft.room
                key = (sender_key, cid)
                if key in batch:  # the same message twice in one batch
                    results.append(Committed(draft, batch[key], fresh=False))
                    continue
                next_id += 1
                # Positional and without a helper per row: this loop runs for every message.
                message = StoredMessage(
                    next_id,
                    ts,
                    room,
                    sender_key,
                    draft.sender,
                    draft.recipient_key,
                    draft.recipient,
                    draft.action,
                    draft.body,
                    cid,
                )
                batch[key] = message
                results.append(Committed(draft, message, True))
                rows += (  # channel, then _COLUMNS
                    channel_of(room, sender_key, draft.recipient_key),
                    next_id,
                    ts,
                    room,
                    sender_key,
                    draft.sender,
                    draft.recipient_key,
                    draft.recipient,
                    int(draft.action),
                    draft.body,
                    cid,
                )
            count = len(batch)
            marks = ", ".join([_ROW_MARKS] * count)
            started = time.perf_counter()
            before = db.total_changes
            await db.execute(
                f"INSERT INTO messages (channel, {_COLUMNS}) VALUES {marks}"
                " ON CONFLICT (sender_key, cid) DO NOTHING",
                rows,
            )
            self._last_id = next_id
            if db.total_changes - before != count:
                results = await self._resolve_retries(results)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        except sqlite3.Error as exc:
            await self._resync_last_id()
            self._set_writable(False, f"{type(exc).__name__}: {exc}")
            self._notify_failed(drafts, StoreUnavailable(str(exc)))
            return
        except Exception as exc:
            log.exception("storing a batch of %d messages failed", len(drafts))
            await self._resync_last_id()
            self._notify_failed(drafts, StoreFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.batches += 1
        self.batched += len(results)
        self._set_writable(True, None)
        if self._listener is not None:
            try:
                self._listener.committed(results)
            except Exception as exc:
                # Stored, but neither fanned out nor acknowledged: say so to the senders,
                # who resend the same cid and get the original id back.
                log.exception("the commit listener failed on a batch of %d", len(results))
                self._notify_failed(drafts, StoreFailed(f"{type(exc).__name__}: {exc}"))

    async def _resync_last_id(self) -> None:
        """After a failed batch, take the newest id from the file itself."""
        try:
            self._last_id = int(
                await _scalar(self._writer, "SELECT COALESCE(MAX(id), 0) FROM messages")
            )
        except Exception:
            log.exception("could not read the newest message id")

    async def _resolve_retries(self, results: list[Committed]) -> list[Committed]:
        """Some rows were skipped as already stored: answer those with the stored rows."""
        stored = await self._existing([r.draft for r in results])
        resolved = []
        for result in results:
            original = stored[(result.draft.sender_key, result.draft.cid)]
            fresh = result.fresh and original.id == result.message.id
            resolved.append(Committed(result.draft, original, fresh))
        return resolved

    async def _run_ops(self, ops: list[_Op]) -> None:
        """Run operations in one transaction, one commit for all of them (a storm of new
        nicks costs a few commits, not one each), each inside its own savepoint: one that
        fails is rolled back alone and fails alone. Results are given out after the commit.
        """
        db = self._writer
        done: list[tuple[_Op, Any]] = []
        try:
            await db.execute("BEGIN IMMEDIATE")
            for op in ops:
                await db.execute("SAVEPOINT op")
                try:
                    value = await op.run(db)
                except Exception as exc:
                    await db.execute("ROLLBACK TO op")
                    await db.execute("RELEASE op")
                    self._op_failed(op, exc)
                    continue
                await db.execute("RELEASE op")
                done.append((op, value))
            await db.execute("COMMIT")
        except Exception as exc:  # the transaction itself: nothing of it was stored
            try:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rolling back the writer's transaction failed")
            for op in ops:
                self._op_failed(op, exc)
            return
        self._set_writable(True, None)
        for op, value in done:
            if not op.future.done():
                op.future.set_result(value)

    def _op_failed(self, op: _Op, exc: Exception) -> None:
        if op.future.done():
            return
        if isinstance(exc, sqlite3.Error):
            self._set_writable(False, f"{type(exc).__name__}: {exc}")
            op.future.set_exception(StoreUnavailable(str(exc)))
        else:
            log.error("the writer operation %s failed", op.name, exc_info=exc)
            op.future.set_exception(StoreFailed(f"{type(exc).__name__}: {exc}"))

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

    async def messages(
        self,
        scope: Scope,
        *,
        after: int = 0,
        before: int | None = None,
        oldest_first: bool = False,
        page: int = 32,
    ) -> AsyncGenerator[list[StoredMessage], None]:
        """The scope's messages with ``after < id < before``, one page at a time.

        Newest first unless ``oldest_first``. Each page is its own short query (keyset
        paging), so a reader that stops early costs nothing more and no read transaction
        stays open between pages. The first page holds ``page`` rows, each next one twice
        as many (up to ``MAX_PAGE``): a caller that needs few rows reads few.
        """
        where, params = _scope_sql(scope)
        order = "ASC" if oldest_first else "DESC"
        sql = (
            f"SELECT {_COLUMNS} FROM messages WHERE id > :low AND id < :high AND ({where})"
            f" ORDER BY id {order} LIMIT :page"
        )
        low, high = after, before if before is not None else _NO_ID
        while low < high - 1:
            rows = await self._reader.execute_fetchall(
                sql, {**params, "low": low, "high": high, "page": page}
            )
            if not rows:
                return
            messages = [_message(row) for row in rows]
            yield messages
            if len(messages) < page:
                return
            page = min(page * 2, MAX_PAGE)
            if oldest_first:
                low = messages[-1].id
            else:
                high = messages[-1].id

    async def missing_rooms(self, rooms: Iterable[str]) -> list[str]:
        """Those of ``rooms`` that are not in the room list yet."""
        unknown = [room for room in dict.fromkeys(rooms) if room not in self._known_rooms]
        if not unknown:
            return []
        marks = ", ".join("?" for _ in unknown)
        rows = await self._reader.execute_fetchall(
            f"SELECT name FROM rooms WHERE name IN ({marks})", unknown
        )
        known = {str(row[0]) for row in rows}
        self._known_rooms.update(known)
        return [room for room in unknown if room not in known]

    async def room_page(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Room names after ``after`` in name order: up to ``limit``, and whether more follow."""
        rows = await self._reader.execute_fetchall(
            "SELECT name FROM rooms WHERE name > ? ORDER BY name LIMIT ?",
            (after or "", limit + 1),
        )
        names = [str(row[0]) for row in rows]
        return names[:limit], len(names) > limit

    async def registered_nick(self, key: str) -> str | None:
        """The registered spelling of a nick, or None if nobody ever claimed it."""
        rows = await self._reader.execute_fetchall(
            "SELECT nick FROM nicks WHERE nick_key = ?", (key,)
        )
        for row in rows:
            return str(row[0])
        return None


async def _scalar(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    async with db.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    return row[0] if row else None
