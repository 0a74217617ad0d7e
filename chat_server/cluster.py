"""Cross-replica fan-out and presence: what makes N server processes behave as one chat.

Each replica keeps its own connections in its :class:`~chat_server.fanout.Hub`, as a
single server does. What is shared goes through PostgreSQL, and only through it:

**Messages.** A replica's writer commits a batch and acknowledges its senders; it does
*not* deliver the batch. Every replica — the writer's own included — delivers messages
from one ordered stream: the ``LISTEN`` connection's notifications, which PostgreSQL sends
in commit order, which is id order (see ``backends.postgres``). So every client on every
replica sees one order. :attr:`Cluster.position` is the newest id delivered here.

**Catch-ups.** A ``history``, ``join`` or ``resume`` reads the database, whose snapshot
may already hold a message whose notification has not reached this replica yet. The
session holds its live frames (``member.hold``) during the catch-up as before, and
before releasing them waits here until the stream has passed the database's newest id
(:meth:`Cluster.caught_up`): every message the catch-up could have sent has then been
through the hold, where the session drops it as covered, and every later one follows
live. Nothing is missed, nothing doubled.

**Presence.** Who is online, in which rooms, on which replica, is in the ``online``
tables, changed by one transaction per event, and each change is notified on a second
channel. Every replica applies the events in order to a :class:`PresenceView` of the
whole cluster; the hub adds the other replicas' part of it to ``who``, ``rooms`` and
``joined``. A replica's own sessions announce their presence locally, as on one server
(``presence.py``, coalesced per tick); events from other replicas become presence for
this replica's members through the same coalescing, computed by nick: a takeover moving
``alice`` from replica A to B changes no room she is in, so nobody sees a leave and a
join (B's session learns from the database which rooms she held elsewhere). Claiming a
nick is serialized per nick in the database and numbered; the replica holding the
replaced session closes it with 4001 when the event arrives.

**Failures.** Each replica writes a heartbeat every ``heartbeat`` seconds on its LISTEN
connection. A replica silent for ``timeout`` seconds (``kill -9``, a network cut) is
removed by any other, with its sessions, and everyone sees them leave. When the LISTEN
connection breaks (PostgreSQL restarted), the replica reconnects, delivers what it
missed from the table, reloads the presence view, and removes sessions of its own that
the database still lists but that are gone. It never reaps others for ``timeout``
seconds after reconnecting, so that after an outage every replica first gets a chance
to write its heartbeat.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chat_protocol import CloseCode
from chat_server import metrics
from chat_server.backends.base import StoreUnavailable
from chat_server.backends.postgres import (
    MESSAGES_CHANNEL,
    PRESENCE_CHANNEL,
    IdRange,
    OnlineSession,
    PostgresStore,
    PresenceEvent,
    Subscription,
    parse_batch,
)
from chat_server.fanout import Delivered, Hub, Member
from chat_server.messages import EncodedFrames, StoredMessage
from chat_server.presence import Presence

log = logging.getLogger(__name__)

#: Messages read per query when delivering what the stream missed during an outage.
GAP_PAGE = 1000
#: Close code for sessions this replica can no longer vouch for: reconnect and resume.
RECONNECT = 1012  # "service restart"


@dataclass(slots=True)
class _Live:
    nick_key: str
    nick: str
    replica: str
    rooms: set[str] = field(default_factory=set)


#: A presence change for one room, by nick: (room, "join" | "leave" | "rename", nick, old).
Change = tuple[str, str, str, str | None]


class PresenceView:
    """Every live session of the cluster and its rooms, kept from the ordered events."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._sessions: dict[str, _Live] = {}
        self._rooms: dict[str, dict[str, _Live]] = {}  # room -> session -> live
        self._nicks: dict[str, Counter[str]] = {}  # room -> nick_key -> sessions
        # nick_key -> its sessions on the other replicas: every hello asks whether its
        # nick is live elsewhere, and a scan of the whole view made a hello O(sessions).
        self._elsewhere: Counter[str] = Counter()

    # --- reads (the hub's RemoteView: the other replicas only) -----------------------

    def nicks(self, room: str | None) -> list[str]:
        lives = self._sessions.values() if room is None else self._rooms.get(room, {}).values()
        return [live.nick for live in lives if live.replica != self.replica]

    def count(self, room: str) -> int:
        return sum(1 for live in self._rooms.get(room, {}).values() if live.replica != self.replica)

    def is_online(self, key: str) -> bool:
        return self._elsewhere[key] > 0

    def rooms_of(self, session: str) -> set[str]:
        """The rooms a session is in, as the stream has told."""
        live = self._sessions.get(session)
        return set(live.rooms) if live is not None else set()

    def sessions_of(self, replica: str) -> list[str]:
        return [s for s, live in self._sessions.items() if live.replica == replica]

    def replica_of(self, session: str) -> str | None:
        live = self._sessions.get(session)
        return live.replica if live is not None else None

    # --- changes ---------------------------------------------------------------------

    def _put(self, session: str, live: _Live) -> None:
        self._pop(session)
        self._sessions[session] = live
        if live.replica != self.replica:
            self._elsewhere[live.nick_key] += 1

    def _pop(self, session: str) -> _Live | None:
        live = self._sessions.pop(session, None)
        if live is not None and live.replica != self.replica:
            self._elsewhere[live.nick_key] -= 1
            if self._elsewhere[live.nick_key] <= 0:
                del self._elsewhere[live.nick_key]
        return live

    def has(self, room: str, nick_key: str) -> bool:
        """Whether the nick is in the room on any replica, this one included."""
        nicks = self._nicks.get(room)
        return nicks is not None and nicks[nick_key] > 0

    def _enter(self, session: str, live: _Live, room: str) -> None:
        live.rooms.add(room)
        self._rooms.setdefault(room, {})[session] = live
        self._nicks.setdefault(room, Counter())[live.nick_key] += 1

    def _exit(self, session: str, live: _Live, room: str) -> None:
        live.rooms.discard(room)
        lives = self._rooms.get(room)
        if lives is None or lives.pop(session, None) is None:
            return
        nicks = self._nicks[room]
        nicks[live.nick_key] -= 1
        if nicks[live.nick_key] <= 0:
            del nicks[live.nick_key]
        if not lives:
            del self._rooms[room]
            del self._nicks[room]

    def apply(self, event: PresenceEvent) -> list[Change]:
        """Apply one event; what it changes for each room, by nick (not by session)."""
        before: dict[tuple[str, str], tuple[str, bool]] = {}

        def touch(room: str, live: _Live) -> None:
            key = (room, live.nick_key)
            if key not in before:
                before[key] = (live.nick, self.has(room, live.nick_key))

        def remove(session: str) -> None:
            live = self._pop(session)
            if live is not None:
                for room in list(live.rooms):
                    touch(room, live)
                    self._exit(session, live, room)

        changes: list[Change] = []
        kind = event.kind
        if kind == "online":
            for session, _ in event.replaced:
                remove(session)
            live = self._sessions.get(event.session)
            if live is not None and (live.nick_key, live.nick) != (event.nick_key, event.nick):
                # A nick change: the rooms see a rename, not a leave and a join.
                old, rooms = live.nick, sorted(live.rooms)
                for room in rooms:
                    self._exit(event.session, live, room)
                live = _Live(event.nick_key, event.nick, live.replica)
                self._put(event.session, live)
                for room in rooms:
                    self._enter(event.session, live, room)
                    changes.append((room, "rename", event.nick, old))
            if live is None:
                live = _Live(event.nick_key, event.nick, event.replica)
                self._put(event.session, live)
            wanted = set(event.rooms)
            for room in live.rooms - wanted:
                touch(room, live)
                self._exit(event.session, live, room)
            for room in wanted - live.rooms:
                touch(room, live)
                self._enter(event.session, live, room)
        elif kind == "offline":
            remove(event.session)
        elif kind in ("join", "leave"):
            live = self._sessions.get(event.session)
            if live is not None:
                for room in event.rooms:
                    touch(room, live)
                    if kind == "join":
                        self._enter(event.session, live, room)
                    else:
                        self._exit(event.session, live, room)
        elif kind == "gone":
            for session in self.sessions_of(event.replica):
                remove(session)
        for (room, nick_key), (nick, was) in before.items():
            now = self.has(room, nick_key)
            if was != now:
                changes.append((room, "join" if now else "leave", nick, None))
        return changes

    def reload(self, sessions: Iterable[OnlineSession]) -> list[tuple[str, list[Change]]]:
        """Replace the view by a snapshot; per replica, what changed meanwhile."""
        changes: list[tuple[str, list[Change]]] = []
        fresh = {s.session: s for s in sessions}
        for session in [s for s in self._sessions if s not in fresh]:
            replica = self._sessions[session].replica
            changes.append((replica, self.apply(PresenceEvent("offline", session=session))))
        for s in fresh.values():
            event = PresenceEvent(
                "online",
                session=s.session,
                nick_key=s.nick_key,
                nick=s.nick,
                replica=s.replica,
                rooms=s.rooms,
            )
            changes.append((s.replica, self.apply(event)))
        return changes


class Cluster:
    """This replica's part in the cluster: the ordered stream, presence, heartbeats."""

    def __init__(
        self,
        store: PostgresStore,
        hub: Hub,
        presence: Presence,
        *,
        timeout: float = 10.0,
        heartbeat: float = 2.0,
        catchup_timeout: float = 10.0,
        replica: str | None = None,
        encoded: EncodedFrames | None = None,
    ) -> None:
        self.store = store
        #: ``msg`` frames by id, shared with the sessions' catch-ups (session.Context).
        self.encoded = encoded if encoded is not None else EncodedFrames()
        self.hub = hub
        self.presence = presence
        self.host = socket.gethostname()
        self.replica = replica or f"{self.host}-{uuid.uuid4().hex[:8]}"
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.catchup_timeout = catchup_timeout
        self.view = PresenceView(self.replica)
        #: The newest message id delivered here from the stream (None before the first).
        self.position: int | None = None
        #: True while the stream is connected and has delivered everything it missed.
        self.healthy = False
        self._connected_at = 0.0
        self._subscription: Subscription | None = None
        self._delivered = Delivered(timeout=catchup_timeout)
        self._keys: dict[Member, str] = {}  # local live session -> its session id
        self._members: dict[str, Member] = {}  # session id -> local live session
        self._stale: set[str] = set()  # session ids to remove from the online table
        #: Sessions whose end this replica announced (their rooms saw them leave) and whose
        #: offline event has not come back on the stream yet.
        self._left: set[str] = set()
        self._ids = itertools.count(1)
        #: Per nick, the newest claim generation seen (see :meth:`online`).
        self._latest: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._ready = asyncio.Event()

    # --- life ------------------------------------------------------------------------

    async def start(self, ready_within: float = 30.0) -> None:
        """Join the cluster; returns once the stream is connected."""
        await self.store.register_replica(self.replica, self.host)
        self.hub.remote = self.view
        self._tasks = [
            asyncio.create_task(self._run_stream(), name="cluster-stream"),
            asyncio.create_task(self._run_heartbeat(), name="cluster-heartbeat"),
        ]
        try:
            await asyncio.wait_for(self._ready.wait(), ready_within)
        except TimeoutError:
            await self.stop()
            raise StoreUnavailable("the PostgreSQL notification stream did not connect") from None
        log.info("replica %s joined the cluster at message id %s", self.replica, self.position)

    async def stop(self) -> None:
        """Leave the cluster: this replica's sessions end with it, announced at once."""
        self._stopping = True
        if self._background:
            await asyncio.wait(self._background, timeout=self.timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()
        try:
            await self.store.unregister_replica(self.replica)
        except StoreUnavailable as exc:
            log.warning("could not unregister replica %s: %s", self.replica, exc)

    def terminate(self) -> None:
        """Drop the stream's connection at once (a shutdown that cannot wait for
        PostgreSQL); what waits on it fails now."""
        if self._subscription is not None:
            self._subscription.terminate()

    # --- the ordered stream -------------------------------------------------------------

    async def _run_stream(self) -> None:
        backoff = 0.25
        while True:
            queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
            try:
                subscription = await self.store.subscribe(
                    {
                        MESSAGES_CHANNEL: functools.partial(_put, queue, MESSAGES_CHANNEL),
                        PRESENCE_CHANNEL: functools.partial(_put, queue, PRESENCE_CHANNEL),
                    },
                    on_lost=functools.partial(queue.put_nowait, None),
                )
            except StoreUnavailable as exc:
                log.warning("notification stream: cannot connect: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self._subscription = subscription
            try:
                await self._resync()
                backoff = 0.25
                self.healthy = True
                metrics.STREAM_UP.set(1)
                self._connected_at = time.monotonic()
                self._ready.set()
                log.info("notification stream connected at message id %s", self.position)
                while (item := await queue.get()) is not None:
                    channel, payload = item
                    if channel == MESSAGES_CHANNEL:
                        await self._on_batch(payload)
                    else:
                        self._on_presence(PresenceEvent.parse(payload))
                log.warning("notification stream lost at message id %s", self.position)
            except StoreUnavailable as exc:
                log.warning("notification stream failed: %s", exc)
            finally:
                self.healthy = False
                metrics.STREAM_UP.set(0)
                self._subscription = None
                await subscription.close()
            await asyncio.sleep(backoff)

    async def _resync(self) -> None:
        """After (re)connecting: deliver what was missed, reload presence, tidy up."""
        await self.store.register_replica(self.replica, self.host)
        if self.position is None:
            self.position = await self.store.max_id()
            self._delivered.advance(self.position)
        else:
            while True:
                page = await self.store.messages_after(self.position, GAP_PAGE)
                self._deliver(page)
                if len(page) < GAP_PAGE:
                    break
        for replica, changes in self.view.reload(await self.store.online_sessions()):
            if replica != self.replica:
                self._publish(changes)
        mine = set(self.view.sessions_of(self.replica))
        self._stale |= mine - set(self._members)
        self._left &= mine  # the others' offline events were missed: nothing to wait for
        for session, member in list(self._members.items()):
            if session not in mine:  # lost meanwhile (this replica was declared dead)
                self._forget(member)
                member.kick(RECONNECT, "this server lost track of your session: reconnect")
        await self._remove_stale()

    async def _on_batch(self, payload: str) -> None:
        batch = parse_batch(payload)
        if isinstance(batch, IdRange):
            assert self.position is not None
            if batch.last <= self.position:
                return
            batch = await self.store.messages_between(
                max(batch.first, self.position + 1), batch.last
            )
        self._deliver(batch)

    def _deliver(self, messages: Sequence[StoredMessage]) -> None:
        """Fan a committed batch out to this replica's members, in id order."""
        assert self.position is not None
        position = self.position
        fresh = [m for m in messages if m.id > position]  # a resync overlaps the stream
        if not fresh:
            return
        deliveries, delivered = self.hub.deliveries(
            fresh, self.presence.before_messages, self.encoded
        )
        self.hub.publish_many(deliveries)
        self.position = position = fresh[-1].id
        metrics.DELIVERIES.inc(delivered)
        metrics.STREAM_POSITION.set(position)
        metrics.FANOUT_LAG.observe(max(0.0, time.time() - messages[-1].ts / 1000))
        self._delivered.advance(position)

    async def caught_up(self) -> bool:
        """Wait until this replica has delivered every message committed so far.

        A session calls it at the end of a catch-up, before releasing its held frames.
        False when that cannot be known (the database or the stream is down): the
        session must then be closed rather than released, or it might show a message
        twice.
        """
        try:
            target = await self.store.max_id()
        except StoreUnavailable:
            return False
        return await self._delivered.reached(target)

    # --- presence --------------------------------------------------------------------

    def _on_presence(self, event: PresenceEvent) -> None:
        if event.kind == "online" and event.gen > self._latest.get(event.nick_key, 0):
            self._latest[event.nick_key] = event.gen
        elif event.kind == "offline" and self._latest.get(event.nick_key, 0) <= event.gen:
            self._latest.pop(event.nick_key, None)
        if event.kind == "offline":
            self._left.discard(event.session)
        # Rooms told here that a replaced session of this replica left: its connection
        # ended before the takeover arrived, and _depart announced the leave at once.
        told_left: set[str] = set()
        for session, replica in event.replaced:
            if replica == self.replica:
                self._stale.discard(session)
                member = self._members.get(session)
                if session in self._left:
                    self._left.discard(session)
                    told_left |= self.view.rooms_of(session)
                elif member is not None:
                    self._forget(member)
                    if self.hub.online.get(member.nick_key) is member:
                        self.hub.remove(member)  # silently: the nick stays where it was
                    origin = f" from {event.origin}" if event.origin else " elsewhere"
                    member.kick(CloseCode.REPLACED, f"replaced: this nick connected again{origin}")
        if event.kind == "gone" and event.replica == self.replica and not self._stopping:
            # Declared dead by another replica (we were cut off for too long): our
            # sessions are gone for everybody else; resync re-registers and closes them.
            log.warning("replica %s was declared dead by the cluster; rejoining", self.replica)
            if self._subscription is not None:
                self._subscription.fail()
        changes = self.view.apply(event)
        if event.replica != self.replica:  # this replica's sessions announced their own
            changes += self._back(event, told_left, changes)
            self._publish(changes)

    def _back(
        self, event: PresenceEvent, told_left: set[str], changes: list[Change]
    ) -> list[Change]:
        """Joins for the rooms whose members were told the nick left, where the session
        that took over is: for the view nothing changed there (one session of the nick
        replaced another), but this replica's members saw a leave."""
        announced = {(room, nick) for room, _, nick, _ in changes}
        return [
            (room, "join", event.nick, None)
            for room in sorted(told_left.intersection(event.rooms))
            if (room, event.nick) not in announced and self.view.has(room, event.nick_key)
        ]

    def _publish(self, changes: Iterable[Change]) -> None:
        """Queue presence from other replicas with this replica's own (coalesced per tick)."""
        for room, kind, nick, old in changes:
            self.presence.remote(room, kind, nick, old)

    def _forget(self, member: Member) -> None:
        session = self._keys.pop(member, None)
        if session is not None:
            self._members.pop(session, None)

    async def online(
        self,
        member: Member,
        nick: str,
        nick_key: str,
        rooms: Sequence[str],
        takeover: bool,
        origin: str,
    ) -> list[str] | None:
        """Make ``member`` the nick's one live session cluster-wide (hello or a nick change).

        Returns the rooms the nick was in on other replicas, or None when ``takeover`` is
        false and the nick is live elsewhere (nothing changed). Raises StoreUnavailable
        when the database cannot record it (the session is then not live).

        Claims of one nick are serialized in the database and numbered (a generation).
        Two claims on this replica may resume here in either order; the older one, or
        one whose replacement was announced already, is closed with 4001 as replaced.
        """
        session = self._keys.get(member)
        if session is None:
            session = f"{self.replica}-{next(self._ids)}"
        try:
            claimed = await self.store.session_online(
                session, nick_key, nick, self.replica, rooms, origin, takeover=takeover
            )
        except StoreUnavailable:
            if member not in self._keys:
                self._stale.add(session)  # it may have committed: remove it later
            raise
        if claimed is None:
            return None
        gen, elsewhere = claimed
        if self._latest.get(nick_key, 0) > gen:
            self._stale.add(session)
            member.kick(CloseCode.REPLACED, "replaced: this nick connected again elsewhere")
            raise StoreUnavailable("replaced while connecting")
        self._latest[nick_key] = gen
        self._keys[member] = session
        self._members[session] = member
        return elsewhere

    async def room(self, member: Member, room: str, *, joined: bool) -> None:
        session = self._keys.get(member)
        if session is not None:
            await self.store.session_room(session, room, joined=joined)

    def offline(self, member: Member) -> None:
        """The member's connection ended: remove it from the online table (retried)."""
        session = self._keys.get(member)
        if session is None:
            return
        self._forget(member)
        self._stale.add(session)
        self._left.add(session)
        if not self._stopping:
            task = asyncio.create_task(self._remove_stale())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _remove_stale(self) -> None:
        for session in list(self._stale):
            try:
                await self.store.session_offline(session)
            except StoreUnavailable:
                return  # the heartbeat retries
            self._stale.discard(session)

    # --- heartbeat and reaping ---------------------------------------------------------

    async def _run_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            subscription = self._subscription
            if subscription is None or not self.healthy:
                continue
            try:
                known = await subscription.heartbeat(self.replica)
            except StoreUnavailable as exc:
                log.warning("heartbeat failed: %s", exc)
                continue  # the subscription reports itself lost
            if not known and not self._stopping:
                log.warning("replica %s is no longer registered; rejoining", self.replica)
                subscription.fail()
                continue
            try:
                if self._stale:
                    await self._remove_stale()
                if time.monotonic() - self._connected_at >= self.timeout:
                    for replica in await self.store.reap(self.timeout):
                        log.warning("replica %s stopped answering; its sessions ended", replica)
            except StoreUnavailable as exc:
                log.warning("cluster upkeep failed: %s", exc)


def _put(queue: asyncio.Queue[tuple[str, str] | None], channel: str, payload: str) -> None:
    queue.put_nowait((channel, payload))
