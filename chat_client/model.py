"""What the user sees, as data: windows (rooms and DM conversations) and their lines.

Both the full-screen UI and line mode read this model; neither talks to the network.
Messages are kept in id order and each id once, whatever order and however many times
they arrive (live, replayed, in a history page): that is what makes the pane show every
message exactly once after a reconnect.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chat_protocol.names import nick_key

Frame = dict[str, Any]

SERVER_WINDOW = "*"


class EntryKind:
    MESSAGE = "message"
    PENDING = "pending"
    NOTICE = "notice"
    GAP = "gap"


@dataclass(slots=True)
class Entry:
    kind: str
    window: str
    text: str
    ts: float = field(default_factory=time.time)
    nick: str = ""
    id: int | None = None
    action: bool = False
    mention: bool = False
    direct: bool = False
    cid: str | None = None
    sort: tuple[int, int] = (0, 0)


@dataclass
class Window:
    name: str  # "#room", "@nick" or "*"
    entries: list[Entry] = field(default_factory=list)
    pending: dict[str, Entry] = field(default_factory=dict)
    ids: set[int] = field(default_factory=set)
    members: list[str] = field(default_factory=list)
    unread: int = 0
    oldest_id: int | None = None
    more: bool = False
    #: Messages with after < id < before were not replayed: (after, before, marker).
    gap: tuple[int, int, Entry] | None = None

    def history_before(self) -> int | None:
        """Where /history should page back from: the gap first, else the oldest line."""
        return self.gap[1] if self.gap else self.oldest_id

    @property
    def newest_id(self) -> int:
        for entry in reversed(self.entries):
            if entry.id is not None:
                return entry.id
        return 0

    def insert(self, entry: Entry) -> None:
        """Place an entry by its sort key (message id, then arrival)."""
        bisect.insort(self.entries, entry, key=lambda e: e.sort)

    def lines(self) -> list[Entry]:
        return [*self.entries, *self.pending.values()]


class ChatModel:
    def __init__(self, nick: str, room: str | None = None) -> None:
        self.nick = nick
        self.windows: dict[str, Window] = {SERVER_WINDOW: Window(SERVER_WINDOW)}
        self.active = SERVER_WINDOW
        if room is not None:  # what is typed before the server answers goes here
            self.switch("#" + room)
        self.status = "connecting"
        self.listeners: list[Callable[[Entry], None]] = []
        self.on_mention: Callable[[Entry], None] | None = None
        self._seq = 0

    # --- windows ---------------------------------------------------------------------------

    def window(self, name: str) -> Window:
        if name not in self.windows:
            self.windows[name] = Window(name)
        return self.windows[name]

    def switch(self, name: str) -> None:
        self.window(name).unread = 0
        self.active = name

    def cycle(self, step: int) -> None:
        names = list(self.windows)
        self.switch(names[(names.index(self.active) + step) % len(names)])

    def close(self, name: str) -> None:
        if name in self.windows and name != SERVER_WINDOW:
            del self.windows[name]
            if self.active == name:
                self.active = next(iter(reversed(self.windows)))

    # --- entries ---------------------------------------------------------------------------

    def notice(self, text: str, window: str | None = None) -> None:
        self._add(Entry(EntryKind.NOTICE, window or self.active, text))

    def add_pending(self, cid: str, window: str, body: str, action: bool) -> None:
        entry = Entry(EntryKind.PENDING, window, body, nick=self.nick, action=action, cid=cid)
        self.window(window).pending[cid] = entry
        self._emit(entry)

    def _add(self, entry: Entry, *, live: bool = True) -> None:
        window = self.window(entry.window)
        self._seq += 1
        if entry.id is not None:
            entry.sort = (entry.id, 0)
        else:
            entry.sort = (window.newest_id, self._seq)
        window.insert(entry)
        if live and entry.window != self.active and entry.kind == EntryKind.MESSAGE:
            window.unread += 1
        self._emit(entry)

    def _emit(self, entry: Entry) -> None:
        for listener in self.listeners:
            listener(entry)

    def message(self, frame: Frame, *, live: bool = True) -> Entry | None:
        """Add a ``msg`` frame once; None if this id is already shown."""
        msg_id = frame.get("id")
        if not isinstance(msg_id, int):
            return None
        sender = str(frame.get("from", "?"))
        me = nick_key(self.nick)
        if "room" in frame:
            name = "#" + str(frame["room"])
        else:
            other = str(frame.get("to")) if nick_key(sender) == me else sender
            name = "@" + other
        window = self.window(name)
        cid = frame.get("cid")
        if isinstance(cid, str) and nick_key(sender) == me:
            window.pending.pop(cid, None)
        if msg_id in window.ids:
            return None
        window.ids.add(msg_id)
        body = str(frame.get("body", ""))
        entry = Entry(
            EntryKind.MESSAGE,
            name,
            body,
            ts=int(frame.get("ts", 0)) / 1000,
            nick=sender,
            id=msg_id,
            action=bool(frame.get("action")),
            direct="room" not in frame,
            cid=cid if isinstance(cid, str) else None,
            mention=nick_key(sender) != me and _mentions(body, self.nick),
        )
        window.oldest_id = msg_id if window.oldest_id is None else min(window.oldest_id, msg_id)
        self._add(entry, live=live and nick_key(sender) != me)
        from_other = nick_key(sender) != me
        if live and (entry.mention or (entry.direct and from_other)) and self.on_mention:
            self.on_mention(entry)
        return entry

    # --- frames from the server ------------------------------------------------------------

    def apply(self, frame: Frame) -> None:
        kind = frame.get("type")
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(frame)

    def _on_msg(self, frame: Frame) -> None:
        self.message(frame)

    def _on_welcome(self, frame: Frame) -> None:
        self.nick = str(frame["nick"])
        self.notice(f"connected as {self.nick}", SERVER_WINDOW)

    def _on_joined(self, frame: Frame) -> None:
        name = "#" + str(frame["room"])
        window = self.window(name)
        window.members = [str(m) for m in frame.get("members", [])]
        if self.active == SERVER_WINDOW:
            self.switch(name)

    def _on_left(self, frame: Frame) -> None:
        self.close("#" + str(frame["room"]))

    def _on_history(self, frame: Frame) -> None:
        messages = frame.get("messages", [])
        if "room" in frame:
            target: str | None = "#" + str(frame["room"])
        elif "with" in frame:
            target = "@" + str(frame["with"])
        else:
            target = None
        for message in messages:
            if isinstance(message, dict):
                self.message(message, live=False)
        if target is not None:
            window = self.window(target)
            window.more = bool(frame.get("more"))
            self._fill_gap(window, messages, window.more)

    def _on_gap(self, frame: Frame) -> None:
        after, before = int(frame.get("after", 0)), int(frame.get("before", 0))
        for window in self.windows.values():
            if window.name.startswith("#"):
                text = "some messages were missed here: /history loads them"
                entry = Entry(EntryKind.GAP, window.name, text, sort=(before - 1, 0))
                window.insert(entry)
                window.gap = (after, before, entry)
                self._emit(entry)

    def _fill_gap(self, window: Window, messages: list[Frame], more: bool) -> None:
        if window.gap is None:
            return
        after, _, entry = window.gap
        ids = [m["id"] for m in messages if isinstance(m, dict) and isinstance(m.get("id"), int)]
        if not ids or not more or min(ids) <= after + 1:
            window.entries.remove(entry)
            window.gap = None
        else:
            window.entries.remove(entry)
            entry.sort = (min(ids) - 1, 0)
            window.insert(entry)
            window.gap = (after, min(ids), entry)

    def _on_presence(self, frame: Frame) -> None:
        name = "#" + str(frame.get("room"))
        window = self.window(name)
        nick, event = str(frame.get("nick")), frame.get("event")
        nicks = [str(n) for n in frame.get("nicks") or [nick]]  # a coalesced run of nicks
        if event == "join":
            window.members += [n for n in nicks if n not in window.members]
            self.notice(f"{', '.join(nicks)} joined", name)
        elif event == "leave":
            window.members = [m for m in window.members if m not in nicks]
            self.notice(f"{', '.join(nicks)} left", name)
        elif event == "rename":
            old = str(frame.get("old"))
            window.members = [nick if m == old else m for m in window.members]
            self.notice(f"{old} is now {nick}", name)

    def _on_renamed(self, frame: Frame) -> None:
        self.nick = str(frame["nick"])
        self.notice(f"you are now {self.nick}")

    def _on_members(self, frame: Frame) -> None:
        nicks = ", ".join(str(n) for n in frame.get("nicks", []))
        where = f"in #{frame['room']}" if "room" in frame else "online"
        self.notice(f"{where}: {nicks or 'nobody'}")

    def _on_rooms(self, frame: Frame) -> None:
        rooms = frame.get("rooms", [])
        listing = ", ".join(f"#{r.get('name')} ({r.get('members')})" for r in rooms)
        self.notice(f"rooms: {listing or 'none'}")

    def _on_error(self, frame: Frame) -> None:
        code, message = frame.get("code"), frame.get("message")
        cid = frame.get("cid")
        if isinstance(cid, str) and code not in ("unavailable", "rate_limited"):
            for window in self.windows.values():  # refused for good: no longer pending
                window.pending.pop(cid, None)
        self.notice(f"error {code}: {message}")


def _mentions(body: str, nick: str) -> bool:
    lowered, key = body.lower(), nick.lower()
    start = lowered.find(key)
    while start >= 0:
        before = lowered[start - 1] if start else " "
        end = start + len(key)
        after = lowered[end] if end < len(lowered) else " "
        if not (before.isalnum() or before in "_-") and not (after.isalnum() or after in "_-"):
            return True
        start = lowered.find(key, start + 1)
    return False
