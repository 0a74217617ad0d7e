"""PostgreSQL persistence through asyncpg: the shared store of a cluster of replicas.

Every replica of the server writes to one database. Three promises of the single server
have to hold across them, and this module is where they are kept:

* **Ids strictly increasing in commit order.** A sequence is not enough (``nextval``
  order is not commit order: a transaction that drew id 7 may commit after one that drew
  id 8, and a reader could then see 8 without 7). So a batch is stored by one call of the
  ``chat_append`` function, which takes a transaction-scoped advisory lock, numbers the
  rows after ``max(id)``, inserts them, and queues a ``NOTIFY`` — all before the lock is
  released at commit. Batches are therefore numbered, committed and notified one at a
  time, in one order, cluster-wide; any snapshot that sees id *n* sees every id below it.
  One round trip per batch; the result comes back only after the commit (asyncpg
  resolves a query at ReadyForQuery, after the implicit transaction has committed).
* **One ordered stream.** PostgreSQL delivers notifications in commit order. A
  notification carries the batch's rows inline when they fit in the 8000-byte payload
  limit, otherwise only the id range, which the listener then reads back.
* **A cid stored once.** ``ON CONFLICT (sender_key, cid) DO NOTHING`` under the same lock:
  a resend to any replica finds the original row and gets its id and ts.

Bodies are stored as UTF-8 ``bytea``: PostgreSQL ``text`` cannot hold U+0000, and the
protocol stores and relays a body exactly as sent.

The presence tables (``replicas``, ``online``, ``online_rooms``) hold who is connected to
which replica; their changes are notified on a second channel in the same transaction.
SQL lives only here; ``chat_server.cluster`` decides what to do with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

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

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    #: A pooled connection, as the store's queries get it.
    Db = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)

#: How long past its query timeout a database call may go unanswered before its caller
#: (a batch write's senders) is told ``unavailable`` (a cancelled query waits for a
#: server that may never answer).
WRITE_GRACE = 1.0

T = TypeVar("T")

#: Notification channels: committed message batches, and presence changes.
MESSAGES_CHANNEL = "chat_messages"
PRESENCE_CHANNEL = "chat_presence"

#: Advisory lock keys (the one-bigint key space): message numbering, migrations.
_APPEND_LOCK = 7_201_100
_MIGRATE_LOCK = 7_201_101
#: Two-int key space, first key: one lock per nick while its session changes hands.
_NICK_LOCK_CLASS = 7_201

#: What a failed database call raises when the database, not the query, is the problem.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
#: ... and, on a connection of its own, when PostgreSQL ended the session (see
#: ``PostgresStore._attempt``).
LOST_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, asyncpg.InternalClientError)

#: Settings for every session of a replica. A replica cut off from the network in the
#: middle of a statement (its Sync never arrives) would otherwise keep its transaction,
#: and the numbering lock with it, until the kernel gives up on the connection, which
#: by default takes hours: every replica's writes would wait. Keepalives find a dead
#: peer within about 11 s, and an abandoned transaction is ended after 10 s.
SESSION_SETTINGS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "idle_in_transaction_session_timeout": "10000",
}

MIGRATIONS: tuple[str, ...] = (
    # 1: nicks, rooms, messages, the numbering function; replicas and who is online.
    """
    CREATE TABLE nicks (
        nick_key    text PRIMARY KEY,
        nick        text NOT NULL,
        secret_hash bytea NOT NULL,
        created_ts  bigint NOT NULL,
        confirmed   boolean NOT NULL,
        since_id    bigint NOT NULL
    );
    CREATE TABLE rooms (
        name       text PRIMARY KEY,
        created_ts bigint NOT NULL
    );
    CREATE TABLE messages (
        id            bigint PRIMARY KEY,
        ts            bigint NOT NULL,
        channel       text NOT NULL,
        room          text,
        sender_key    text NOT NULL,
        sender        text NOT NULL,
        recipient_key text,
        recipient     text,
        action        boolean NOT NULL,
        body          bytea NOT NULL,
        cid           text NOT NULL,
        CHECK ((room IS NULL) <> (recipient_key IS NULL))
    );
    CREATE UNIQUE INDEX messages_sender_cid ON messages (sender_key, cid);
    CREATE INDEX messages_channel ON messages (channel, id);
    CREATE INDEX messages_dm_recipient ON messages (recipient_key, id)
        WHERE recipient_key IS NOT NULL;
    CREATE INDEX messages_dm_sender ON messages (sender_key, id)
        WHERE recipient_key IS NOT NULL;
    INSERT INTO meta (key, value)
        VALUES ('probe', '0'), ('epoch', substr(md5(gen_random_uuid()::text), 1, 16));

    CREATE FUNCTION chat_append(
        p_channel text[], p_room text[], p_sender_key text[], p_sender text[],
        p_recipient_key text[], p_recipient text[], p_action boolean[], p_body bytea[],
        p_cid text[], OUT o_base bigint, OUT o_ts bigint, OUT o_ids bigint[]
    ) LANGUAGE plpgsql AS $fn$
    DECLARE
        v_rows text;
        v_first bigint;
        v_last bigint;
        v_payload text;
    BEGIN
        -- One batch at a time, cluster-wide, until this transaction commits: ids are
        -- assigned in commit order and the notification is queued in that order.
        PERFORM pg_advisory_xact_lock(7201100);
        SELECT COALESCE(max(m.id), 0) INTO o_base FROM messages AS m;
        o_ts := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
        WITH ins AS (
            INSERT INTO messages AS m (id, ts, channel, room, sender_key, sender,
                                       recipient_key, recipient, action, body, cid)
            SELECT o_base + t.ord, o_ts, t.channel, t.room, t.sender_key, t.sender,
                   t.recipient_key, t.recipient, t.action, t.body, t.cid
            FROM unnest(p_channel, p_room, p_sender_key, p_sender, p_recipient_key,
                        p_recipient, p_action, p_body, p_cid)
                 WITH ORDINALITY AS t(channel, room, sender_key, sender, recipient_key,
                                      recipient, action, body, cid, ord)
            ON CONFLICT (sender_key, cid) DO NOTHING
            RETURNING m.id, m.room, m.sender_key, m.sender, m.recipient_key,
                      m.recipient, m.action, m.body, m.cid
        )
        SELECT array_agg(ins.id ORDER BY ins.id), min(ins.id), max(ins.id),
               json_agg(json_build_array(ins.id, ins.room, ins.sender_key, ins.sender,
                                         ins.recipient_key, ins.recipient, ins.action,
                                         ins.body, ins.cid) ORDER BY ins.id)::text
          INTO o_ids, v_first, v_last, v_rows
          FROM ins;
        IF v_first IS NOT NULL THEN
            v_payload := json_build_object('ts', o_ts, 'rows', v_rows::json)::text;
            IF octet_length(v_payload) >= 8000 THEN  -- NOTIFY's payload limit
                v_payload := json_build_object('first', v_first, 'last', v_last)::text;
            END IF;
            PERFORM pg_notify('chat_messages', v_payload);
        END IF;
        o_ids := COALESCE(o_ids, '{}');
    END
    $fn$;

    CREATE TABLE replicas (
        id      text PRIMARY KEY,
        host    text NOT NULL,
        started timestamptz NOT NULL DEFAULT now(),
        seen    timestamptz NOT NULL DEFAULT now()
    );
    -- Claims of a nick are numbered, so a replica can tell which of two came last.
    CREATE SEQUENCE online_gen;
    CREATE TABLE online (
        session  text PRIMARY KEY,
        nick_key text NOT NULL UNIQUE,
        nick     text NOT NULL,
        replica  text NOT NULL REFERENCES replicas ON DELETE CASCADE,
        gen      bigint NOT NULL,
        since    timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE online_rooms (
        session text NOT NULL REFERENCES online ON DELETE CASCADE,
        room    text NOT NULL,
        PRIMARY KEY (session, room)
    );
    CREATE INDEX online_rooms_room ON online_rooms (room);
    """,
    # 2: limits and quotas shared by the replicas: token buckets per (limit, key), and
    # each replica's open connections per address.
    """
    CREATE TABLE quota_buckets (
        name   text NOT NULL,
        key    text NOT NULL,
        tokens double precision NOT NULL,
        stamp  double precision NOT NULL,  -- seconds, the database's clock
        rate   double precision NOT NULL,
        burst  double precision NOT NULL,
        PRIMARY KEY (name, key)
    );
    CREATE TABLE connections (
        replica text NOT NULL REFERENCES replicas ON DELETE CASCADE,
        address text NOT NULL,
        count   integer NOT NULL,
        PRIMARY KEY (replica, address)
    );
    """,
)

_NOW = "extract(epoch FROM clock_timestamp())"
#: A bucket's tokens now: refilled since its stamp, up to its burst.
_REFILLED = f"LEAST(b.burst, b.tokens + ({_NOW} - b.stamp) * b.rate)"

_COLUMNS = "id, ts, room, sender_key, sender, recipient_key, recipient, action, body, cid"
_NO_ID = 2**63 - 1


def _scope_sql(scope: Scope) -> tuple[str, list[Any]]:
    """The WHERE condition (besides the id range) for a scope, and its parameters $1...

    The direct messages' condition is two indexed look-ups that PostgreSQL combines.
    """
    parts: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if scope.with_key is not None:
        pair = param(channel_of(None, scope.key, scope.with_key))
        parts.append(f"(channel = {pair} AND id > {param(scope.since)})")
    channels = scope.channels()
    if channels:
        parts.append(f"channel = ANY({param(channels)}::text[])")
    if scope.direct:
        key, since = param(scope.key), param(scope.since)
        parts.append(
            f"(recipient_key IS NOT NULL AND (recipient_key = {key} OR sender_key = {key})"
            f" AND id > {since})"
        )
    return " OR ".join(parts) or "false", params


@dataclass(frozen=True, slots=True)
class OnlineSession:
    """A row of the ``online`` table: one live session somewhere in the cluster."""

    session: str
    nick_key: str
    nick: str
    replica: str
    rooms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A change to who is online, as notified on :data:`PRESENCE_CHANNEL`.

    ``kind`` is ``online`` (a session is live with ``rooms``; it replaced the sessions in
    ``replaced``, or, for a session already live, it changed nick), ``offline``,
    ``join``, ``leave``, or ``gone`` (every session of ``replica`` ended with it).
    """

    kind: str
    session: str = ""
    nick_key: str = ""
    nick: str = ""
    replica: str = ""
    rooms: tuple[str, ...] = ()
    replaced: tuple[tuple[str, str], ...] = ()  # (session, replica)
    origin: str = ""  # where the new session came from, for the 4001 reason
    gen: int = 0  # the claim's generation (online) or the ended claim's (offline)

    def payload(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "session": self.session,
                "nick_key": self.nick_key,
                "nick": self.nick,
                "replica": self.replica,
                "rooms": list(self.rooms),
                "replaced": [list(pair) for pair in self.replaced],
                "origin": self.origin,
                "gen": self.gen,
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, payload: str) -> PresenceEvent:
        data = json.loads(payload)
        return cls(
            kind=data["kind"],
            session=data["session"],
            nick_key=data["nick_key"],
            nick=data["nick"],
            replica=data["replica"],
            rooms=tuple(data["rooms"]),
            replaced=tuple((s, r) for s, r in data["replaced"]),
            origin=data["origin"],
            gen=data["gen"],
        )


@dataclass(frozen=True, slots=True)
class IdRange:
    """A notified batch too large to travel inline: read ids ``first``..``last`` back."""

    first: int
    last: int


def parse_batch(payload: str) -> list[StoredMessage] | IdRange:
    """The messages of a :data:`MESSAGES_CHANNEL` notification, or the range to read."""
    data = json.loads(payload)
    if "rows" not in data:
        return IdRange(int(data["first"]), int(data["last"]))
    ts = int(data["ts"])
    return [
        StoredMessage(
            id=row[0],
            ts=ts,
            room=row[1],
            sender_key=row[2],
            sender=row[3],
            recipient_key=row[4],
            recipient=row[5],
            action=row[6],
            body=bytes.fromhex(row[7][2:]).decode(),  # bytea as JSON: "\\x<hex>"
            cid=row[8],
        )
        for row in data["rows"]
    ]


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(
        id=row[0],
        ts=row[1],
        room=row[2],
        sender_key=row[3],
        sender=row[4],
        recipient_key=row[5],
        recipient=row[6],
        action=row[7],
        body=bytes(row[8]).decode(),
        cid=row[9],
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _nick_lock(key: str) -> int:
    """A stable 31-bit number for a nick key (the second key of its advisory lock)."""
    return int.from_bytes(hashlib.blake2s(key.encode(), digest_size=4).digest()) >> 1


class Subscription:
    """A dedicated connection that LISTENs; ``on_lost`` is called once when it breaks."""

    def __init__(
        self, connection: asyncpg.Connection, timeout: float, on_lost: Callable[[], None]
    ) -> None:
        self._connection = connection
        self._timeout = timeout
        self._on_lost = on_lost
        self.lost = False
        connection.add_termination_listener(lambda _: self.fail())

    def fail(self) -> None:
        """Report the connection as lost (its owner then closes it and reconnects)."""
        if not self.lost:
            self.lost = True
            self._on_lost()

    async def heartbeat(self, replica: str) -> bool:
        """Mark ``replica`` alive, on this very connection (so a dead link is noticed).

        False if the replica is no longer registered: the cluster declared it dead.
        """
        try:
            value = await self._connection.fetchval(
                "UPDATE replicas SET seen = now() WHERE id = $1 RETURNING true",
                replica,
                timeout=self._timeout,
            )
        except LOST_ERRORS as exc:
            self.fail()
            raise StoreUnavailable(_describe(exc)) from exc
        return bool(value)

    async def close(self) -> None:
        self.lost = True
        try:
            await asyncio.wait_for(self._connection.close(), self._timeout)
        except DB_ERRORS:
            self._connection.terminate()

    def terminate(self) -> None:
        """Drop the connection at once, without a word to the server."""
        self.lost = True
        self._connection.terminate()


class PostgresStore:
    """History, nicks, rooms and presence in PostgreSQL; a group-committing writer."""

    def __init__(
        self,
        url: str,
        pool: asyncpg.Pool,
        *,
        batch_max: int,
        queue_max: int,
        batch_wait: float,
        timeout: float,
    ) -> None:
        self.url = url
        self._pool = pool
        self._batch_max = max(1, min(batch_max, 5000))
        self._batch_wait = batch_wait
        self._timeout = timeout
        self._queue: asyncio.Queue[Draft | None] = asyncio.Queue(queue_max)
        self._task: asyncio.Task[None] | None = None
        self._listener: CommitListener | None = None
        self._known_rooms: set[str] = set()
        self._last_id = 0
        self.epoch = ""
        self.batches = 0
        self.batched = 0
        self.writable = True
        self.last_error: str | None = None
        #: Operations given up on, still running (see :meth:`_run`).
        self._abandoned: set[asyncio.Future[Any]] = set()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        batch_max: int = 512,
        queue_max: int = 10_000,
        batch_wait: float = 0.0,
        query_timeout: float = 10.0,
        pool_size: int = 8,
        connect_for: float = 30.0,
    ) -> PostgresStore:
        """Connect (retrying for ``connect_for`` seconds while the database starts), migrate."""
        deadline = time.monotonic() + connect_for
        while True:
            try:
                pool = await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=pool_size,
                    timeout=query_timeout,
                    # Every statement, also those without a timeout of their own: a
                    # database that stops answering must never hang the server.
                    command_timeout=query_timeout,
                    server_settings={**SESSION_SETTINGS, "application_name": "chat-server"},
                )
                break
            except DB_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
                log.warning("waiting for PostgreSQL: %s", exc)
                await asyncio.sleep(1.0)
        store = cls(
            url,
            pool,
            batch_max=batch_max,
            queue_max=queue_max,
            batch_wait=batch_wait,
            timeout=query_timeout,
        )
        try:
            await store._migrate()
            store._last_id = await store.max_id()
            store.epoch = str(await pool.fetchval("SELECT value FROM meta WHERE key = 'epoch'"))
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> None:
        async with self._pool.acquire() as db, db.transaction():
            # Replicas starting together: one migrates, the others wait and see it done.
            await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)"
            )
            version = int(await db.fetchval("SELECT value FROM meta WHERE key = 'schema'") or 0)
            if version > len(MIGRATIONS):
                raise RuntimeError(f"database schema {version} is newer than this server knows")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                log.info("migrating database schema to version %d", number)
                await db.execute(script)
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', $1)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    str(number),
                )

    @property
    def last_id(self) -> int:
        return self._last_id

    def start(self, listener: CommitListener) -> None:
        self._listener = listener
        self._task = asyncio.create_task(self._run_writer(), name="store-writer")

    async def close(self) -> None:
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._pool.is_closing():  # terminated
            return
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except DB_ERRORS:
            self._pool.terminate()

    def terminate(self) -> None:
        """Drop every pooled connection at once, without a word to the server: whatever
        waits on one fails now (a cancelled asyncpg query would wait for the server to
        confirm the cancellation, which a server that does not answer never does)."""
        self._pool.terminate()

    # --- plumbing ------------------------------------------------------------------

    async def _run(self, work: Callable[[Db], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection, answered within the query timeout and
        ``WRITE_GRACE`` whatever PostgreSQL does.

        Past its timeout a query is cancelled, and asyncpg then waits for the server to
        confirm the cancellation, first in the query, then again when the connection goes
        back to the pool: a paused or cut-off server never confirms, and a request would
        wait twice the timeout for each query it makes. So the caller waits for the
        deadline only; an attempt still running then (or when the caller is cancelled)
        is left to end by itself (asyncpg's own timeouts end it and drop its connection).
        """
        attempt = asyncio.ensure_future(self._attempt(work))
        try:
            await asyncio.wait({attempt}, timeout=self._timeout + WRITE_GRACE)
        except asyncio.CancelledError:
            self._abandon(attempt)
            raise
        if not attempt.done():
            self._abandon(attempt)
            error = f"PostgreSQL did not answer within {self._timeout + WRITE_GRACE:g} s"
            self._set_writable(False, error)
            raise StoreUnavailable(error)
        return attempt.result()

    def _abandon(self, attempt: asyncio.Future[Any]) -> None:
        """Cancel an attempt nobody waits for any more, and keep it until it has ended."""
        attempt.cancel()
        self._abandoned.add(attempt)
        attempt.add_done_callback(self._forget_abandoned)

    def _forget_abandoned(self, attempt: asyncio.Future[Any]) -> None:
        self._abandoned.discard(attempt)
        if not attempt.cancelled():
            attempt.exception()  # retrieved: its caller was answered already

    async def _attempt(self, work: Callable[[Db], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection, however long asyncpg takes.

        The database refusing becomes StoreUnavailable; anything else (a bug) is logged
        with its traceback and becomes StoreFailed. Neither stops anything else.

        A connection whose client-side protocol state is broken raises asyncpg's
        ``InternalClientError``: PostgreSQL ended the session (a restart, an
        administrator) while the connection sat idle in the pool, asyncpg took the
        unsolicited ``FATAL`` for a protocol error and put the connection in its error
        state, and the pool handed it out before the close that follows reached it. No
        statement can run on it: the connection is dropped, and the operation ends as
        one whose connection broke, ``unavailable`` (the answer to a lost database, never
        ``internal``; a send resent by cid is answered with the original if an earlier
        statement of it was committed).
        """
        try:
            async with self._pool.acquire(timeout=self._timeout) as db:
                try:
                    value = await work(db)
                except asyncpg.InternalClientError:
                    db.terminate()
                    raise
        except DB_ERRORS as exc:
            self._set_writable(False, _describe(exc))
            raise StoreUnavailable(_describe(exc)) from exc
        except asyncpg.InternalClientError as exc:
            log.warning("a PostgreSQL connection was unusable, dropped it: %s", exc)
            self._set_writable(False, _describe(exc))
            raise StoreUnavailable(_describe(exc)) from exc
        except (StoreUnavailable, StoreFailed, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("a PostgreSQL operation failed")
            raise StoreFailed(f"{type(exc).__name__}: {exc}") from exc
        self._set_writable(True, None)
        return value

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def fetch(db: Db) -> list[asyncpg.Record]:
            return list(await db.fetch(sql, *args, timeout=self._timeout))

        return await self._run(fetch)

    def _set_writable(self, writable: bool, error: str | None) -> None:
        if writable != self.writable:
            if writable:
                log.warning("database reachable again")
            else:
                log.error("database unavailable: %s", error)
        self.writable = writable
        self.last_error = error

    # --- writes --------------------------------------------------------------------

    async def submit(self, draft: Draft) -> None:
        await self._queue.put(draft)

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
        """Register ``nick`` or check ``secret``: the rules of the SQLite store's claim.

        Claims of one nick are serialized by an advisory lock, so two replicas
        registering it at once cannot both succeed. Most claims are a client coming back
        to a confirmed registration, which never changes: a read answers those, with no
        transaction and no lock.
        """
        rows = await self._fetch(
            "SELECT nick, secret_hash, since_id FROM nicks WHERE nick_key = $1 AND confirmed",
            key,
        )
        for row in rows:
            if secret is not None and hmac.compare_digest(
                bytes(row["secret_hash"]), _hash_secret(secret)
            ):
                return NickClaim(ClaimStatus.GRANTED, row["nick"], since=row["since_id"])
            return NickClaim(ClaimStatus.TAKEN, row["nick"])

        async def claim(db: Db) -> NickClaim:
            async with db.transaction():
                await db.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)", _NICK_LOCK_CLASS, _nick_lock(key)
                )
                row = await db.fetchrow(
                    "SELECT nick, secret_hash, confirmed, created_ts, since_id"
                    " FROM nicks WHERE nick_key = $1",
                    key,
                    timeout=self._timeout,
                )
                now = _now_ms()
                if row is not None:
                    stored = bytes(row["secret_hash"])
                    if secret is not None and hmac.compare_digest(stored, _hash_secret(secret)):
                        if not row["confirmed"]:
                            await db.execute(
                                "UPDATE nicks SET confirmed = true WHERE nick_key = $1", key
                            )
                        return NickClaim(ClaimStatus.GRANTED, row["nick"], since=row["since_id"])
                    age = now - row["created_ts"]
                    if row["confirmed"] or online or age < claim_ttl * 1000:
                        return NickClaim(ClaimStatus.TAKEN, row["nick"])
                if not may_register:
                    return NickClaim(ClaimStatus.NOT_ALLOWED, nick)
                if secret is not None and len(secret) < MIN_PROPOSED_SECRET_CHARS:
                    return NickClaim(ClaimStatus.WEAK_SECRET, nick)
                new_secret = secrets.token_urlsafe(24) if secret is None else None
                chosen = secret if secret is not None else new_secret
                assert chosen is not None
                since = int(await db.fetchval("SELECT COALESCE(max(id), 0) FROM messages"))
                if row is not None:  # expired: its messages' cids go with it (sqlite.py)
                    await db.execute(
                        "UPDATE messages SET cid = '~' || id WHERE sender_key = $1 AND id > $2",
                        key,
                        row["since_id"],
                    )
                await db.execute(
                    "INSERT INTO nicks"
                    " (nick_key, nick, secret_hash, created_ts, confirmed, since_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (nick_key) DO UPDATE SET"
                    " nick = EXCLUDED.nick, secret_hash = EXCLUDED.secret_hash,"
                    " created_ts = EXCLUDED.created_ts, confirmed = EXCLUDED.confirmed,"
                    " since_id = EXCLUDED.since_id",
                    key,
                    nick,
                    _hash_secret(chosen),
                    now,
                    secret is not None,
                    since,
                )
                return NickClaim(ClaimStatus.REGISTERED, nick, new_secret, since)

        return await self._run(claim)

    async def create_rooms(self, rooms: Sequence[str]) -> None:
        rooms = [room for room in rooms if room not in self._known_rooms]
        if not rooms:
            return

        async def insert(db: Db) -> None:
            await db.execute(
                "INSERT INTO rooms (name, created_ts) SELECT name, $2 FROM unnest($1::text[])"
                " AS name ON CONFLICT (name) DO NOTHING",
                rooms,
                _now_ms(),
                timeout=self._timeout,
            )

        await self._run(insert)
        self._known_rooms.update(rooms)

    async def probe(self) -> None:
        async def touch(db: Db) -> None:
            await db.execute(
                "UPDATE meta SET value = $1 WHERE key = 'probe'",
                str(_now_ms()),
                timeout=self._timeout,
            )

        await self._run(touch)

    async def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            if self._batch_wait and item is not None and self._queue.qsize() < self._batch_max:
                await asyncio.sleep(self._batch_wait)
            batch: list[Draft] = []
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if len(batch) >= self._batch_max or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                try:
                    await self._write_messages(batch)
                except Exception as exc:  # a bug: fail this batch, never the writer
                    log.exception("the writer failed on a batch; failing it and going on")
                    self._notify_failed(batch, StoreFailed(f"{type(exc).__name__}: {exc}"))

    def _notify_failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        if self._listener is not None:
            try:
                self._listener.failed(drafts, error)
            except Exception:
                log.exception("the commit listener failed on a failed batch")

    async def _write_messages(self, drafts: list[Draft]) -> None:
        """Store a batch with one call of ``chat_append``: one round trip, one commit."""
        unique: dict[tuple[str, str], Draft] = {}
        for draft in drafts:
            unique.setdefault((draft.sender_key, draft.cid), draft)
        rows = list(unique.values())
        columns: list[list[Any]] = [[] for _ in range(9)]
        for d in rows:
            for column, value in zip(
                columns,
                (
                    channel_of(d.room, d.sender_key, d.recipient_key),
                    d.room,
                    d.sender_key,
                    d.sender,
                    d.recipient_key,
                    d.recipient,
                    d.action,
                    d.body.encode(),
                    d.cid,
                ),
                strict=True,
            ):
                column.append(value)

        async def append(
            db: Db,
        ) -> tuple[int, int, set[int], dict[tuple[str, str], StoredMessage]]:
            row = await db.fetchrow(
                "SELECT o_base, o_ts, o_ids FROM chat_append($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                *columns,
                timeout=self._timeout,
            )
            assert row is not None
            ids = set(row[2])
            existing = {}
            if len(ids) < len(rows):  # some (sender, cid) were stored before: retries
                existing = await self._existing(db, rows)
            return int(row[0]), int(row[1]), ids, existing

        started = time.perf_counter()
        work = asyncio.ensure_future(self._attempt(append))
        # Past its own timeout a query is cancelled, and asyncpg waits for the server to
        # confirm: a paused or cut-off server never does. The senders are not kept waiting.
        await asyncio.wait({work}, timeout=self._timeout + WRITE_GRACE)
        if not work.done():
            await self._unanswered(work, drafts)
            return
        try:
            base, ts, ids, existing = work.result()
        except (StoreUnavailable, StoreFailed) as exc:
            # The outcome of a batch whose connection broke is unknown; a resend of the
            # same cid is safe either way (stored at most once, answered with the original).
            self._notify_failed(drafts, exc)
            if isinstance(exc.__cause__, TimeoutError):
                # PostgreSQL did not answer in time: what queued meanwhile would wait as
                # long again, past its deadline. Refused at once, as in _unanswered.
                while not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        self._queue.put_nowait(None)
                        break
                    self._notify_failed([item], exc)
            return
        stored: dict[tuple[str, str], StoredMessage] = {}
        fresh_keys: set[tuple[str, str]] = set()
        for ordinal, d in enumerate(rows, start=1):
            key = (d.sender_key, d.cid)
            if base + ordinal in ids:
                fresh_keys.add(key)
                stored[key] = StoredMessage(
                    id=base + ordinal,
                    ts=ts,
                    room=d.room,
                    sender_key=d.sender_key,
                    sender=d.sender,
                    recipient_key=d.recipient_key,
                    recipient=d.recipient,
                    action=d.action,
                    body=d.body,
                    cid=d.cid,
                )
            else:
                stored[key] = existing[key]
        results: list[Committed] = []
        for draft in drafts:
            key = (draft.sender_key, draft.cid)
            fresh = key in fresh_keys
            fresh_keys.discard(key)  # the same cid twice in a batch: fresh only once
            results.append(Committed(draft, stored[key], fresh))
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        if ids:
            self._last_id = max(self._last_id, max(ids))
        self.batches += 1
        self.batched += len(results)
        if self._listener is not None:
            try:
                self._listener.committed(results)
            except Exception as exc:
                # Stored, but neither fanned out nor acknowledged: the senders resend the
                # same cid and get the original back.
                log.exception("the commit listener failed on a batch of %d", len(results))
                self._notify_failed(drafts, StoreFailed(f"{type(exc).__name__}: {exc}"))

    async def _unanswered(self, work: asyncio.Future[Any], drafts: Sequence[Draft]) -> None:
        """A batch PostgreSQL has not answered: ``unavailable`` for its senders now, and
        for every send queued until the write ends, at once.

        The batch's outcome stays unknown, as the protocol says of a connection that broke
        mid-commit: a resend of the same cid is stored at most once and answered with the
        original. (Its messages, if they were committed, reach every replica from the
        notification stream all the same.)
        """
        error = StoreUnavailable(
            f"PostgreSQL did not answer a write within {self._timeout + WRITE_GRACE:g} s"
        )
        self._set_writable(False, str(error))
        self._notify_failed(drafts, error)
        while not work.done():
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            item = getter.result()
            if item is None:  # stopping: the writer's loop sees it once this write ends
                self._queue.put_nowait(None)
                await asyncio.wait({work})
                break
            self._notify_failed([item], error)
        if not work.cancelled() and work.exception() is None:
            log.warning(
                "a write PostgreSQL answered late was committed after its %d senders were"
                " told unavailable; they resend by cid and get the original",
                len(drafts),
            )

    async def _existing(
        self, db: Db, drafts: Sequence[Draft]
    ) -> dict[tuple[str, str], StoredMessage]:
        rows = await db.fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE (sender_key, cid) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            [d.sender_key for d in drafts],
            [d.cid for d in drafts],
            timeout=self._timeout,
        )
        found = {}
        for row in rows:
            message = _message(row)
            found[(message.sender_key, message.cid)] = message
        return found

    # --- reads ---------------------------------------------------------------------

    async def _select(self, sql: str, *args: Any) -> list[StoredMessage]:
        return [_message(row) for row in await self._fetch(sql, *args)]

    async def max_id(self) -> int:
        """The newest committed id (0 for none): what any snapshot taken now can see."""
        rows = await self._fetch("SELECT COALESCE(max(id), 0) FROM messages")
        return int(rows[0][0])

    async def messages(
        self,
        scope: Scope,
        *,
        after: int = 0,
        before: int | None = None,
        oldest_first: bool = False,
        page: int = 32,
    ) -> AsyncGenerator[list[StoredMessage], None]:
        """The scope's messages with ``after < id < before``, a page (one query) at a time.

        The first page holds ``page`` rows, each next one twice as many (up to
        ``MAX_PAGE``): a caller that needs few rows reads few.
        """
        where, params = _scope_sql(scope)
        order = "ASC" if oldest_first else "DESC"
        n = len(params)
        sql = (
            f"SELECT {_COLUMNS} FROM messages WHERE id > ${n + 1} AND id < ${n + 2}"
            f" AND ({where}) ORDER BY id {order} LIMIT ${n + 3}"
        )
        low, high = after, before if before is not None else _NO_ID
        while low < high - 1:
            messages = await self._select(sql, *params, low, high, page)
            if not messages:
                return
            yield messages
            if len(messages) < page:
                return
            page = min(page * 2, MAX_PAGE)
            if oldest_first:
                low = messages[-1].id
            else:
                high = messages[-1].id

    async def missing_rooms(self, rooms: Iterable[str]) -> list[str]:
        unknown = [room for room in dict.fromkeys(rooms) if room not in self._known_rooms]
        if not unknown:
            return []
        rows = await self._fetch("SELECT name FROM rooms WHERE name = ANY($1::text[])", unknown)
        known = {str(row[0]) for row in rows}
        self._known_rooms.update(known)
        return [room for room in unknown if room not in known]

    async def room_page(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        rows = await self._fetch(
            "SELECT name FROM rooms WHERE name > $1 ORDER BY name LIMIT $2",
            after or "",
            limit + 1,
        )
        names = [str(row[0]) for row in rows]
        return names[:limit], len(names) > limit

    async def messages_between(self, first: int, last: int) -> list[StoredMessage]:
        """Every message with ``first <= id <= last``, in id order (a notified range)."""
        return await self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE id BETWEEN $1 AND $2 ORDER BY id",
            first,
            last,
        )

    async def messages_after(self, after: int, limit: int) -> list[StoredMessage]:
        """The oldest ``limit`` messages with a larger id than ``after``, in id order."""
        return await self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE id > $1 ORDER BY id LIMIT $2",
            after,
            limit,
        )

    async def registered_nick(self, key: str) -> str | None:
        rows = await self._fetch("SELECT nick FROM nicks WHERE nick_key = $1", key)
        return str(rows[0][0]) if rows else None

    # --- the stream -----------------------------------------------------------------

    async def subscribe(
        self, handlers: dict[str, Callable[[str], None]], on_lost: Callable[[], None]
    ) -> Subscription:
        """A new connection LISTENing on each channel; handlers get notification payloads."""
        try:
            connection = await asyncpg.connect(
                self.url,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings={**SESSION_SETTINGS, "application_name": "chat-server-listen"},
            )
            subscription = Subscription(connection, self._timeout, on_lost)
            for channel, handler in handlers.items():
                await connection.add_listener(
                    channel, lambda _c, _p, _ch, payload, h=handler: h(payload)
                )
        except DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return subscription

    # --- replicas and presence -----------------------------------------------------

    async def register_replica(self, replica: str, host: str) -> None:
        async def register(db: Db) -> None:
            await db.execute(
                "INSERT INTO replicas (id, host) VALUES ($1, $2)"
                " ON CONFLICT (id) DO UPDATE SET seen = now()",
                replica,
                host,
                timeout=self._timeout,
            )

        await self._run(register)

    async def reap(self, silence: float) -> list[str]:
        """Remove replicas silent for ``silence`` seconds, with their sessions."""

        async def reap(db: Db) -> list[str]:
            async with db.transaction():
                rows = await db.fetch(
                    "DELETE FROM replicas WHERE seen < now() - make_interval(secs => $1)"
                    " RETURNING id",
                    silence,
                    timeout=self._timeout,
                )
                gone = [str(row[0]) for row in rows]
                for replica in gone:
                    await self._notify(db, PresenceEvent("gone", replica=replica))
            return gone

        return await self._run(reap)

    async def unregister_replica(self, replica: str) -> None:
        """A clean shutdown: the replica's sessions end with it, announced at once."""

        async def unregister(db: Db) -> None:
            async with db.transaction():
                await db.execute("DELETE FROM replicas WHERE id = $1", replica)
                await self._notify(db, PresenceEvent("gone", replica=replica))

        await self._run(unregister)

    async def _notify(self, db: Db, event: PresenceEvent) -> None:
        await db.execute("SELECT pg_notify($1, $2)", PRESENCE_CHANNEL, event.payload())

    async def session_online(
        self,
        session: str,
        nick_key: str,
        nick: str,
        replica: str,
        rooms: Iterable[str],
        origin: str,
        *,
        takeover: bool = True,
    ) -> tuple[int, list[str]] | None:
        """Make ``session`` the one live session of ``nick_key``, replacing any other.

        Used by ``hello`` and by a nick change of a live session (then ``rooms`` are the
        session's rooms). Serialized per nick by an advisory lock, so two sessions claiming
        one nick at once on two replicas end with exactly one of them live. Returns the
        claim's generation and the rooms the replaced sessions were in; None, changing
        nothing, when ``takeover`` is false and another session of the nick is live.
        """
        rooms = list(dict.fromkeys(rooms))

        async def online(db: Db) -> tuple[int, list[str]] | None:
            async with db.transaction():
                await db.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)", _NICK_LOCK_CLASS, _nick_lock(nick_key)
                )
                others = "FROM online WHERE nick_key = $1 AND session <> $2"
                held = await db.fetch(
                    f"SELECT DISTINCT r.room FROM online_rooms AS r WHERE r.session IN"
                    f" (SELECT session {others})",
                    nick_key,
                    session,
                )
                if not takeover and await db.fetchval(
                    f"SELECT EXISTS (SELECT 1 {others})", nick_key, session
                ):
                    return None
                replaced = await db.fetch(
                    f"DELETE {others} RETURNING session, replica", nick_key, session
                )
                gen = int(await db.fetchval("SELECT nextval('online_gen')"))
                await db.execute(
                    "INSERT INTO online (session, nick_key, nick, replica, gen)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session) DO UPDATE"
                    " SET nick_key = EXCLUDED.nick_key, nick = EXCLUDED.nick, gen = EXCLUDED.gen",
                    session,
                    nick_key,
                    nick,
                    replica,
                    gen,
                )
                await db.execute("DELETE FROM online_rooms WHERE session = $1", session)
                await db.execute(
                    "INSERT INTO online_rooms (session, room) SELECT $1, unnest($2::text[])",
                    session,
                    rooms,
                )
                event = PresenceEvent(
                    "online",
                    session=session,
                    nick_key=nick_key,
                    nick=nick,
                    replica=replica,
                    rooms=tuple(rooms),
                    replaced=tuple((str(r[0]), str(r[1])) for r in replaced),
                    origin=origin,
                    gen=gen,
                )
                await self._notify(db, event)
            return gen, [str(r[0]) for r in held]

        return await self._run(online)

    async def session_offline(self, session: str) -> None:
        async def offline(db: Db) -> None:
            async with db.transaction():
                row = await db.fetchrow(
                    "DELETE FROM online WHERE session = $1 RETURNING nick_key, nick, replica, gen",
                    session,
                )
                if row is not None:
                    event = PresenceEvent(
                        "offline",
                        session=session,
                        nick_key=row[0],
                        nick=row[1],
                        replica=row[2],
                        gen=row[3],
                    )
                    await self._notify(db, event)

        await self._run(offline)

    async def session_room(self, session: str, room: str, *, joined: bool) -> None:
        """Record that a live session joined (or left) a room, and announce it."""

        async def change(db: Db) -> None:
            async with db.transaction():
                row = await db.fetchrow(
                    "SELECT nick_key, nick, replica FROM online WHERE session = $1 FOR SHARE",
                    session,
                )
                if row is None:  # replaced or gone meanwhile: nothing to record
                    return
                if joined:
                    done = await db.fetchval(
                        "INSERT INTO online_rooms (session, room) VALUES ($1, $2)"
                        " ON CONFLICT DO NOTHING RETURNING true",
                        session,
                        room,
                    )
                else:
                    done = await db.fetchval(
                        "DELETE FROM online_rooms WHERE session = $1 AND room = $2 RETURNING true",
                        session,
                        room,
                    )
                if done:
                    kind = "join" if joined else "leave"
                    event = PresenceEvent(
                        kind,
                        session=session,
                        nick_key=row[0],
                        nick=row[1],
                        replica=row[2],
                        rooms=(room,),
                    )
                    await self._notify(db, event)

        await self._run(change)

    # --- shared limits ---------------------------------------------------------------

    async def take_tokens(
        self, name: str, key: str, cost: float, rate: float, burst: float
    ) -> float:
        """Spend ``cost`` tokens of a shared bucket: 0.0, or the seconds until possible.

        One statement: the bucket is refilled by the database's clock and charged only
        if it holds enough, atomically, whichever replica asks.
        """

        async def take(db: Db) -> float:
            spent = await db.fetchval(
                "INSERT INTO quota_buckets AS b (name, key, tokens, stamp, rate, burst)"
                f" VALUES ($1, $2, $5::float8 - $3::float8, {_NOW}, $4::float8, $5::float8)"
                " ON CONFLICT (name, key) DO UPDATE SET"
                f" tokens = {_REFILLED} - $3::float8, stamp = {_NOW},"
                " rate = $4::float8, burst = $5::float8"
                f" WHERE {_REFILLED} >= $3::float8"
                " RETURNING true",
                name,
                key,
                cost,
                rate,
                burst,
                timeout=self._timeout,
            )
            if spent:
                return 0.0
            tokens = await db.fetchval(
                f"SELECT {_REFILLED} FROM quota_buckets AS b WHERE name = $1 AND key = $2",
                name,
                key,
            )
            return max(0.001, (cost - float(tokens or 0.0)) / rate)

        return await self._run(take)

    async def spend_tokens(
        self, spends: Sequence[tuple[str, str, float, float, float]]
    ) -> list[tuple[str, str, float]]:
        """Charge many buckets at once, even below zero: (name, key, cost, rate, burst)
        each; the balance of every bucket charged (negative: over its limit)."""

        async def spend(db: Db) -> list[tuple[str, str, float]]:
            rows = await db.fetch(
                "INSERT INTO quota_buckets AS b (name, key, tokens, stamp, rate, burst)"
                f" SELECT n, k, bu - c, {_NOW}, r, bu FROM unnest("
                "$1::text[], $2::text[], $3::float8[], $4::float8[], $5::float8[])"
                " AS t(n, k, c, r, bu)"
                " ON CONFLICT (name, key) DO UPDATE SET"
                f" tokens = {_REFILLED} - (EXCLUDED.burst - EXCLUDED.tokens), stamp = {_NOW},"
                " rate = EXCLUDED.rate, burst = EXCLUDED.burst"
                " RETURNING b.name, b.key, b.tokens",
                *(list(column) for column in zip(*spends, strict=True)),
                timeout=self._timeout,
            )
            return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

        return await self._run(spend)

    async def tokens(self, name: str, key: str) -> float | None:
        """A shared bucket's balance now (None: no such bucket, which means full)."""
        rows = await self._fetch(
            f"SELECT {_REFILLED} FROM quota_buckets AS b WHERE name = $1 AND key = $2", name, key
        )
        return float(rows[0][0]) if rows else None

    async def give_tokens(self, name: str, key: str, cost: float) -> None:
        async def give(db: Db) -> None:
            await db.execute(
                f"UPDATE quota_buckets AS b SET tokens = LEAST(b.burst, {_REFILLED} + $3::float8),"
                f" stamp = {_NOW} WHERE name = $1 AND key = $2",
                name,
                key,
                cost,
                timeout=self._timeout,
            )

        await self._run(give)

    async def forget_full_buckets(self) -> None:
        """Delete buckets that have refilled completely (they hold nothing to remember)."""

        async def forget(db: Db) -> None:
            await db.execute(
                f"DELETE FROM quota_buckets AS b WHERE {_REFILLED} >= b.burst",
                timeout=self._timeout,
            )

        await self._run(forget)

    async def sync_connections(self, replica: str, counts: dict[str, int]) -> dict[str, int]:
        """Record this replica's open connections for ``counts``' addresses (0: none);
        the other replicas' open connections per address."""

        async def sync(db: Db) -> dict[str, int]:
            async with db.transaction():
                if counts:
                    await db.execute(
                        "INSERT INTO connections (replica, address, count)"
                        " SELECT $1, address, count FROM unnest($2::text[], $3::int[])"
                        " AS c(address, count)"
                        " ON CONFLICT (replica, address) DO UPDATE SET count = EXCLUDED.count",
                        replica,
                        list(counts),
                        list(counts.values()),
                    )
                    await db.execute(
                        "DELETE FROM connections WHERE replica = $1 AND count <= 0", replica
                    )
                rows = await db.fetch(
                    "SELECT address, sum(count) FROM connections WHERE replica <> $1"
                    " GROUP BY address HAVING sum(count) > 0",
                    replica,
                    timeout=self._timeout,
                )
            return {str(row[0]): int(row[1]) for row in rows}

        return await self._run(sync)

    async def online_sessions(self) -> list[OnlineSession]:
        """Every live session in the cluster with its rooms (a snapshot for a new view)."""
        rows = await self._fetch(
            "SELECT o.session, o.nick_key, o.nick, o.replica,"
            " COALESCE(array_agg(r.room) FILTER (WHERE r.room IS NOT NULL), '{}')"
            " FROM online AS o LEFT JOIN online_rooms AS r USING (session)"
            " GROUP BY o.session"
        )
        return [
            OnlineSession(str(r[0]), str(r[1]), str(r[2]), str(r[3]), tuple(r[4])) for r in rows
        ]


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
