"""Presence, coalesced: who joined, left or was renamed in a room, sent once per tick.

Sending each join to every member at once makes a mass join of N clients cost N² frames
(2,000 clients joining one room: 4 million frames, 22.7 s). Instead, events are queued
per room and flushed every ``tick`` seconds: each member gets one ``presence`` frame per
run of same-kind events, with every nick of the run in ``nicks``, so the same join costs
about N frames per tick.

Presence never lags behind a message: before a committed message goes to a room, the
room's queued events go first (``before_messages``), so "bob joined" always precedes what
bob says.

Each member receives only what happened *after* its own view of the room: a member that
joined during the tick already has the earlier joins in its ``joined.members``, and it
is never told about its own join or rename (its session answers those requests itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from chat_protocol import encode
from chat_server.fanout import Delivery, Hub, Member

log = logging.getLogger(__name__)

#: Most nicks in one presence frame (about 27 KB at most).
NICKS_PER_FRAME = 1000

#: (event, nick, old nick for a rename, the member it is about)
Event = tuple[str, str, str | None, Member | None]


class Presence:
    def __init__(self, hub: Hub, tick: float = 0.1) -> None:
        self.hub = hub
        self.tick = tick
        self._events: dict[str, list[Event]] = {}
        #: Per room: members whose view starts later than the tick (index into events).
        self._views: dict[str, dict[Member, int]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def joined(self, room: str, member: Member) -> None:
        """``member`` entered ``room`` (it has just been sent the member list)."""
        events = self._queue(room)
        events.append(("join", member.nick, None, member))
        self._views.setdefault(room, {})[member] = len(events)

    def left(self, room: str, nick: str) -> None:
        self._queue(room).append(("leave", nick, None, None))

    def renamed(self, room: str, old: str, member: Member) -> None:
        self._queue(room).append(("rename", member.nick, old, member))

    def remote(self, room: str, event: str, nick: str, old: str | None = None) -> None:
        """A member of another replica joined, left or was renamed (``chat_server.cluster``)."""
        self._queue(room).append((event, nick, old, None))

    def seen(self, room: str, member: Member) -> None:
        """``member`` has just been sent the room's member list: what came before is known."""
        events = self._events.get(room)
        if events:
            self._views.setdefault(room, {})[member] = len(events)

    def _queue(self, room: str) -> list[Event]:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick, self.flush)
        return self._events.setdefault(room, [])

    def flush(self) -> None:
        """Send every queued event; called by the tick."""
        events, views = self._events, self._views
        self._events, self._views, self._timer = {}, {}, None
        try:
            deliveries: list[Delivery] = []
            for room, queued in events.items():
                deliveries.extend(self._room(room, queued, views.get(room, {})))
            self.hub.publish_many(deliveries)
        except Exception:
            log.exception("sending presence failed; those events are lost")

    def before_messages(self, rooms: Iterable[str]) -> list[Delivery]:
        """The queued events of these rooms, taken out of the queue to be sent now."""
        deliveries: list[Delivery] = []
        for room in rooms:
            events = self._events.pop(room, None)
            if events:
                deliveries.extend(self._room(room, events, self._views.pop(room, {})))
        return deliveries

    def _room(self, room: str, events: list[Event], views: dict[Member, int]) -> list[Delivery]:
        actors = {event[3] for event in events if event[0] == "rename"}
        everyone: list[Member] = []
        deliveries: list[Delivery] = []
        for member in self.hub.room_members(room):
            start = views.get(member, 0)
            if start == 0 and member not in actors:
                everyone.append(member)
                continue
            own = [event for event in events[start:] if event[3] is not member]
            deliveries.extend(([member], data, None) for data in _frames(room, own))
        if everyone:
            deliveries.extend((everyone, data, None) for data in _frames(room, events))
        return deliveries


def _frames(room: str, events: Sequence[Event]) -> list[bytes]:
    """Runs of same-kind joins or leaves become one frame each; a rename is its own."""
    frames: list[bytes] = []
    run: list[str] = []
    kind = ""
    for event, nick, old, _ in events:
        if event == "rename":
            frames.extend(_run(room, kind, run))
            run = []
            frames.append(
                encode(
                    {"type": "presence", "event": "rename", "room": room, "old": old, "nick": nick}
                )
            )
            continue
        if event != kind or len(run) >= NICKS_PER_FRAME:
            frames.extend(_run(room, kind, run))
            run, kind = [], event
        run.append(nick)
    frames.extend(_run(room, kind, run))
    return frames


def _run(room: str, kind: str, nicks: list[str]) -> list[bytes]:
    if not nicks:
        return []
    frame: dict[str, Any] = {"type": "presence", "event": kind, "room": room}
    if len(nicks) == 1:
        frame["nick"] = nicks[0]
    frame["nicks"] = nicks
    return [encode(frame)]
