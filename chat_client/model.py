"""What the user sees, as data: numbered windows (the server, rooms, conversations, help)
and their lines.

Both the full-screen UI and line mode read this model; neither talks to the network.
Messages are kept in id order and each id once, whatever order and however many times
they arrive (live, replayed, in a history page): that is what makes the pane show every
message exactly once after a reconnect.

Each window not on screen keeps an activity level, the same four WeeChat's hotlist has:
low (joins, notices), message, private (a direct message) and highlight (your nick or a
highlight word), so the status bar can colour them apart and Alt-A can visit the most
important first.
"""

from __future__ import annotations

import bisect
import heapq
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from chat_protocol.names import nick_key

Frame = dict[str, Any]

SERVER_WINDOW = "*"
HELP_WINDOW = "help"
#: Joins (or leaves) in one window this close together become one line.
NETJOIN_SECONDS = 5.0


class Activity(IntEnum):
    NONE = 0
    LOW = 1  # joins, leaves, notices
    MESSAGE = 2
    PRIVATE = 3  # a direct message
    HIGHLIGHT = 4  # your nick or a highlight word


class EntryKind:
    MESSAGE = "message"
    PENDING = "pending"  # typed, not yet acknowledged
    FAILED = "failed"  # refused for good: never delivered
    NOTICE = "notice"
    PRESENCE = "presence"  # joins or leaves, coalesced
    GAP = "gap"


@dataclass(eq=False, slots=True)
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
    own: bool = False
    cid: str | None = None
    tone: str = "notice"  # notices: notice, error, link (connection state), help
    note: str = ""  # on a pending line: why it waits
    nicks: list[str] = field(default_factory=list)  # presence: who
    added: list[str] = field(default_factory=list)  # presence: who, since last shown
    expanded: bool = False
    collapsed: bool = False  # the screen showed it cut short (set by the renderer)
    sort: tuple[int, int] = (0, 0)
    rendered: Any = field(default=None, repr=False)  # the renderer's cache


@dataclass(eq=False)
class Window:
    name: str  # "#room", "@nick", "*" (server) or "help"
    entries: list[Entry] = field(default_factory=list)
    pending: dict[str, Entry] = field(default_factory=dict)
    ids: set[int] = field(default_factory=set)
    members: list[str] = field(default_factory=list)
    joined: bool = False  # a room we are in (its names were shown)
    names_due: bool = False  # show who is here once the room's catch-up is in
    unread: int = 0
    activity: Activity = Activity.NONE
    oldest_id: int | None = None
    #: Older messages on the server: True, False (the beginning is shown) or None (unknown).
    more: bool | None = None
    loading: bool = False
    #: Messages with after < id < before were not replayed: (after, before, marker).
    gap: tuple[int, int, Entry] | None = None

    @property
    def is_conversation(self) -> bool:
        """A room or a direct conversation: something with history on the server."""
        return self.name[:1] in "#@"

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
        """Entries and pending lines, each where it happened: a notice about something
        typed after 59 unsent lines comes after them, where the eye is."""
        return list(heapq.merge(self.entries, self.pending.values(), key=lambda e: e.sort))


class ChatModel:
    def __init__(self, nick: str, room: str | None = None) -> None:
        self.nick = nick
        self.windows: dict[str, Window] = {SERVER_WINDOW: Window(SERVER_WINDOW)}
        self.active = SERVER_WINDOW
        self.previous = SERVER_WINDOW
        if room is not None:  # what is typed before the server answers goes here
            self.switch("#" + room)
        self.status = "connecting"
        self.listeners: list[Callable[[Entry], None]] = []
        #: Called for a live mention or direct message (the UI rings the bell).
        self.on_mention: Callable[[Entry], None] | None = None
        self.ignored: set[str] = set()  # nick keys
        self.highlights: list[str] = []
        self.away: str | None = None
        self.missed: list[Entry] = []  # mentions and DMs while away
        self.epoch: str | None = None
        self._seq = 0
        self._notice_times: dict[str, float] = {}

    # --- windows ---------------------------------------------------------------------------

    def window(self, name: str) -> Window:
        if name not in self.windows:
            self.windows[name] = Window(name)
        return self.windows[name]

    def number(self, name: str) -> int:
        """The window's number in the window list (the server window is 1)."""
        return list(self.windows).index(name) + 1

    def by_number(self, number: int) -> str | None:
        names = list(self.windows)
        return names[number - 1] if 1 <= number <= len(names) else None

    def switch(self, name: str) -> None:
        window = self.window(name)
        window.unread = 0
        window.activity = Activity.NONE
        if name != self.active:
            self.previous = self.active
        self.active = name

    def cycle(self, step: int) -> None:
        names = list(self.windows)
        self.switch(names[(names.index(self.active) + step) % len(names)])

    def next_active(self) -> str | None:
        """The window to visit next: highest activity first, then the lowest number."""
        best: tuple[int, int] | None = None
        found = None
        for number, (name, window) in enumerate(self.windows.items()):
            if name == self.active or window.activity == Activity.NONE:
                continue
            rank = (-int(window.activity), number)
            if best is None or rank < best:
                best, found = rank, name
        return found

    def close(self, name: str) -> None:
        if name in self.windows and name != SERVER_WINDOW:
            names = list(self.windows)
            index = names.index(name)
            del self.windows[name]
            if self.active == name:
                back = self.previous if self.previous in self.windows else names[index - 1]
                self.switch(back)

    def clear(self, name: str) -> None:
        """Forget a window's lines (history stays on the server: PgUp loads it again)."""
        window = self.window(name)
        window.entries.clear()
        window.ids.clear()
        window.oldest_id = None
        window.more = None
        window.gap = None

    # --- entries ---------------------------------------------------------------------------

    def notice(
        self, text: str, window: str | None = None, tone: str = "notice", *, live: bool = True
    ) -> None:
        """A line from the client itself; ``live=False``: no activity for the window."""
        self._add(Entry(EntryKind.NOTICE, window or self.active, text, tone=tone), live=live)

    def notice_once(self, key: str, text: str, every: float, window: str | None = None) -> None:
        """A notice at most once per ``every`` seconds (for things that come in floods)."""
        now = time.monotonic()
        if now - self._notice_times.get(key, -every) >= every:
            self._notice_times[key] = now
            self.notice(text, window)

    def everywhere(self, text: str, tone: str = "link") -> None:
        """A notice in the server window and every room and conversation."""
        for name, window in self.windows.items():
            if name == SERVER_WINDOW or window.is_conversation:
                self.notice(text, name, tone)

    def add_pending(self, cid: str, window: str, body: str, action: bool) -> None:
        entry = Entry(
            EntryKind.PENDING, window, body, nick=self.nick, action=action, cid=cid, own=True
        )
        self._seq += 1
        entry.sort = (self.window(window).newest_id, self._seq)
        self.window(window).pending[cid] = entry
        self._emit(entry)

    def pending_entry(self, cid: str) -> Entry | None:
        for window in self.windows.values():
            if cid in window.pending:
                return window.pending[cid]
        return None

    def fail_pending(self, cid: str, reason: str) -> None:
        """A line the server refused for good: it stays, marked as never delivered."""
        for window in self.windows.values():
            entry = window.pending.pop(cid, None)
            if entry is not None:
                entry.kind, entry.note = EntryKind.FAILED, reason
                self._add(entry)
                return

    def drop_pending(self, cid: str) -> Entry | None:
        for window in self.windows.values():
            entry = window.pending.pop(cid, None)
            if entry is not None:
                return entry
        return None

    def _add(self, entry: Entry, *, live: bool = True) -> None:
        window = self.window(entry.window)
        self._seq += 1
        if entry.id is not None:
            entry.sort = (entry.id, 0)
        else:
            entry.sort = (window.newest_id, self._seq)
        window.insert(entry)
        if live and entry.window != self.active:
            window.activity = max(window.activity, _activity_of(entry))
            if entry.kind == EntryKind.MESSAGE:
                window.unread += 1
        self._emit(entry)

    def _emit(self, entry: Entry) -> None:
        for listener in self.listeners:
            listener(entry)

    def message(self, frame: Frame, *, live: bool = True) -> Entry | None:
        """Add a ``msg`` frame once; None if this id is already shown (or ignored)."""
        msg_id = frame.get("id")
        if not isinstance(msg_id, int):
            return None
        sender = str(frame.get("from", "?"))
        me = nick_key(self.nick)
        own = nick_key(sender) == me
        if "room" in frame:
            name = "#" + str(frame["room"])
        else:
            name = "@" + (str(frame.get("to")) if own else sender)
        if not own and nick_key(sender) in self.ignored and name not in self.windows:
            return None  # an ignored nick does not open a conversation window
        window = self.window(name)
        cid = frame.get("cid")
        if isinstance(cid, str) and own:
            window.pending.pop(cid, None)
        if msg_id in window.ids:
            return None
        window.ids.add(msg_id)
        window.oldest_id = msg_id if window.oldest_id is None else min(window.oldest_id, msg_id)
        if not own and nick_key(sender) in self.ignored:
            return None
        body = str(frame.get("body", ""))
        entry = Entry(
            EntryKind.MESSAGE,
            name,
            body,
            ts=_seconds(frame.get("ts")),
            nick=sender,
            id=msg_id,
            action=bool(frame.get("action")),
            direct="room" not in frame,
            own=own,
            cid=cid if isinstance(cid, str) else None,
            mention=not own and mentions(body, [self.nick, *self.highlights]),
        )
        self._add(entry, live=live and not own)
        if live and not own and (entry.mention or entry.direct):
            if self.away is not None:
                self.missed.append(entry)
            elif self.on_mention:
                self.on_mention(entry)
        return entry

    def stop_loading(self) -> None:
        """No history page is on its way (refused, or the connection is gone)."""
        for window in self.windows.values():
            window.loading = False

    # --- settings the user changes ---------------------------------------------------------

    def set_away(self, reason: str | None) -> list[Entry]:
        """Go away (no bells; mentions and DMs are kept) or come back (returns them)."""
        self.away = reason
        if reason is not None:
            return []
        missed, self.missed = self.missed, []
        return missed

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
        epoch = frame.get("epoch")
        if isinstance(epoch, str):
            if self.epoch is not None and epoch != self.epoch:
                self._history_reset()
            self.epoch = epoch
        self.notice(f"connected as {self.nick}", SERVER_WINDOW)
        if frame.get("registered"):
            self.notice(
                f"the nick {self.nick} is now registered to you; its secret is kept in your "
                "state directory (without it, nobody can claim the nick)",
                SERVER_WINDOW,
            )

    def _history_reset(self) -> None:
        for window in self.windows.values():
            window.entries = [e for e in window.entries if e.id is None and e.kind != "gap"]
            window.ids.clear()
            window.oldest_id = None
            window.more = None
            window.gap = None
        self.everywhere(
            "the server's history was reset (a new database): older messages are gone",
            tone="error",
        )

    def _on_joined(self, frame: Frame) -> None:
        name = "#" + str(frame["room"])
        window = self.window(name)
        window.members = [str(m) for m in frame.get("members", [])]
        if not window.joined:
            window.joined = window.names_due = True
        if self.active == SERVER_WINDOW:
            self.switch(name)

    def _on_left(self, frame: Frame) -> None:
        self.close("#" + str(frame["room"]))

    def _on_history(self, frame: Frame) -> None:
        messages = [m for m in frame.get("messages", []) if isinstance(m, dict)]
        if "room" in frame:
            target: str | None = "#" + str(frame["room"])
        elif "with" in frame:
            target = "@" + str(frame["with"])
        else:
            target = None
        added = [e for m in messages if (e := self.message(m, live=False)) is not None]
        if target is None:
            if frame.get("ref") == "history":
                more = "; /history loads more" if frame.get("more") else ""
                self.notice(f"loaded {len(added)} older direct messages{more}", SERVER_WINDOW)
            return
        window = self.window(target)
        window.loading = False
        window.more = bool(frame.get("more"))
        self._fill_gap(window, messages, window.more)
        self._names(window)
        if frame.get("ref") == "history":
            self.notice(_loaded_line(target, added, window.more), target)

    def _names(self, window: Window) -> None:
        """Who is in a room we joined: after its history, so it reads as "now"."""
        if window.names_due:
            window.names_due = False
            self.notice(_names_line(window.name, window.members), window.name, live=False)

    def _on_synced(self, frame: Frame) -> None:
        for window in list(self.windows.values()):
            self._names(window)

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
        ids = [m["id"] for m in messages if isinstance(m.get("id"), int)]
        window.entries.remove(entry)
        if not ids or not more or min(ids) <= after + 1:
            window.gap = None
        else:
            entry.sort = (min(ids) - 1, 0)
            window.insert(entry)
            window.gap = (after, min(ids), entry)

    def _on_presence(self, frame: Frame) -> None:
        name = "#" + str(frame.get("room"))
        if name not in self.windows:
            return
        window = self.window(name)
        event = str(frame.get("event"))
        raw = frame.get("nicks")
        nicks = [str(n) for n in raw] if isinstance(raw, list) else [str(frame.get("nick"))]
        if event == "join":
            window.members += [n for n in nicks if n not in window.members]
        elif event == "leave":
            gone = {nick_key(n) for n in nicks}
            window.members = [m for m in window.members if nick_key(m) not in gone]
        elif event == "rename":
            old = str(frame.get("old"))
            window.members = [nicks[0] if m == old else m for m in window.members]
            if nick_key(old) not in self.ignored:
                self.notice(f"{old} is now {nicks[0]}", name)
            return
        else:
            return
        nicks = [n for n in nicks if nick_key(n) not in self.ignored]
        if nicks:
            self._presence(window, event, nicks)

    def _presence(self, window: Window, event: str, nicks: list[str]) -> None:
        """One line per burst of joins (or leaves): a server restart is one "netjoin"."""
        last = window.entries[-1] if window.entries else None
        now = time.time()
        if (
            last is not None
            and last.kind == EntryKind.PRESENCE
            and last.tone == event
            and now - last.ts < NETJOIN_SECONDS
        ):
            last.added = [n for n in nicks if n not in last.nicks]
            last.nicks += last.added
            last.ts = now
            last.text = _presence_text(event, last.nicks)
            self._emit(last)
            return
        entry = Entry(EntryKind.PRESENCE, window.name, _presence_text(event, nicks), tone=event)
        entry.nicks, entry.added = list(nicks), list(nicks)
        self._add(entry)

    def _on_renamed(self, frame: Frame) -> None:
        self.nick = str(frame["nick"])
        self.notice(f"you are now {self.nick}")
        if frame.get("registered"):
            self.notice(f"the nick {self.nick} is now registered to you", SERVER_WINDOW)

    def _on_members(self, frame: Frame) -> None:
        nicks = [str(n) for n in frame.get("nicks", [])]
        ref = frame.get("ref")
        if isinstance(ref, str) and ref.startswith("whois:"):
            online = {nick_key(n): n for n in nicks}
            nick = ref[6:]
            if nick_key(nick) in online:
                self.notice(f"{online[nick_key(nick)]} is online (in none of your rooms)")
            else:
                self.notice(f"{nick} is not online")
            return
        if "room" in frame:
            self.notice(_names_line("#" + str(frame["room"]), nicks))
        else:
            self.notice(f"online ({len(nicks)}): {', '.join(nicks) or 'nobody'}")

    def _on_rooms(self, frame: Frame) -> None:
        rooms = [r for r in frame.get("rooms", []) if isinstance(r, dict)]
        listing = ", ".join(f"#{r.get('name')} ({r.get('members')})" for r in rooms)
        self.notice(f"rooms: {listing or 'none'}")
        if frame.get("more") and rooms:
            self.notice(f"more rooms: /rooms {rooms[-1].get('name')} lists the next ones")

    def _on_error(self, frame: Frame) -> None:
        code, message = str(frame.get("code")), str(frame.get("message"))
        cid = frame.get("cid")
        if code in ("nick_taken", "nick_in_use", "nick_invalid"):
            return  # the controller asks or explains (it knows which request it was)
        if frame.get("ref") in ("scroll", "history"):
            self.stop_loading()  # a refused page: PgUp may ask again
        if isinstance(cid, str) and self.pending_entry(cid) is not None:
            entry = self.pending_entry(cid)
            assert entry is not None
            if code == "rate_limited":
                entry.note = "over the server's rate limit: sending again shortly"
                self.notice_once("rate", f"slowing down: {message}", every=10)
            elif code in ("unavailable", "internal"):
                entry.note = f"the server could not store it ({code}): trying again"
            else:
                self.fail_pending(cid, message)
                return
            self._emit(entry)
            return
        if code == "rate_limited":
            self.notice_once("rate", f"slow down: {message}", every=10)
            return
        self.notice(f"error {code}: {message}", tone="error")


def mentions(body: str, words: Iterable[str]) -> bool:
    """True if ``body`` holds one of ``words`` as a whole word, ignoring case."""
    for word in words:
        if word and re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", body, re.IGNORECASE):
            return True
    return False


def _activity_of(entry: Entry) -> Activity:
    if entry.tone == "link" or (entry.window == SERVER_WINDOW and entry.tone != "error"):
        return Activity.NONE  # "connected as …", "reconnected": no news in a window
    if entry.kind != EntryKind.MESSAGE or entry.own:
        return Activity.LOW
    if entry.mention:
        return Activity.HIGHLIGHT
    if entry.direct:
        return Activity.PRIVATE
    return Activity.MESSAGE


def _seconds(ts: Any) -> float:
    return ts / 1000 if isinstance(ts, int | float) and not isinstance(ts, bool) else time.time()


def _names_line(window: str, nicks: list[str]) -> str:
    count = f"{len(nicks)} here" if nicks else "nobody here"
    return f"{window}: {count}: {', '.join(nicks)}" if nicks else f"{window}: {count}"


def _presence_text(event: str, nicks: list[str]) -> str:
    verb = "joined" if event == "join" else "left"
    if len(nicks) == 1:
        return f"{nicks[0]} {verb}"
    if len(nicks) == 2:
        return f"{nicks[0]} and {nicks[1]} {verb}"
    shown = ", ".join(nicks[:10]) + (f" and {len(nicks) - 10} more" if len(nicks) > 10 else "")
    word = "netjoin" if event == "join" else "netsplit"
    return f"{word}: {len(nicks)} {verb}: {shown}"


def _loaded_line(window: str, added: list[Entry], more: bool) -> str:
    if not added:
        text = "no older messages were loaded"
    else:
        first = time.strftime("%Y-%m-%d %H:%M", time.localtime(added[0].ts))
        text = f"loaded {len(added)} older message{'s' * (len(added) != 1)} (from {first})"
    tail = "; /history loads more" if more else f"; this is the beginning of {window}"
    return text + tail
