"""Turns what the user types into protocol actions, and server frames into the model.

The one place that knows both the connection and the model; the UIs only get ``submit``
(a line typed), ``completions`` (words for Tab), ``answer`` (y or n to a question) and a
few read-only views. Line mode and the full-screen UI share all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from chat_client.commands import ALIASES, NAMES, Command, Invalid, Say, help_lines, parse
from chat_client.connection import (
    ChatConnection,
    Frame,
    JoinRefused,
    LinkState,
    MessageRefused,
    Status,
)
from chat_client.model import HELP_WINDOW, SERVER_WINDOW, ChatModel
from chat_client.secrets import NewUrl, SecretStoreError
from chat_client.settings import Settings
from chat_protocol.names import is_valid_nick, nick_key, normalize_room

#: Messages per page when PgUp reaches the top of a window.
SCROLL_PAGE = 50


@dataclass(frozen=True, slots=True)
class Question:
    """A yes/no question on the input line (the full-screen UI only)."""

    text: str
    on_yes: Callable[[], None]
    on_no: Callable[[], None]


class Controller:
    def __init__(
        self,
        model: ChatModel,
        connection: ChatConnection,
        settings: Settings | None = None,
        *,
        interactive: bool = True,
    ) -> None:
        self.model = model
        self.connection = connection
        self.settings = settings
        #: Questions can be asked (the full-screen UI); line mode cannot answer them.
        self.interactive = interactive
        self.on_change: Callable[[], None] = lambda: None
        self.on_quit: Callable[[], None] = lambda: None
        self.retry_at: float | None = None
        self.question: Question | None = None
        self.refused_lines = 0  # messages refused here, before sending (too long, …)
        #: Commands refused for good (a /join): line mode exits non-zero for them.
        self.refused_commands: list[str] = []
        self._offline_since: float | None = None
        self._was_connected = False
        if settings is not None:
            model.ignored = {nick_key(n) for n in settings.words("ignore")}
            model.highlights = settings.words("highlight")
            if settings.problem:
                model.notice(settings.problem, SERVER_WINDOW, tone="error")

    # --- from the network --------------------------------------------------------------

    def frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if self.connection.dropped_rooms:
            self._drop_rooms()
            if kind == "error" and frame.get("code") != "rate_limited":
                self.on_change()
                return  # said, with the rooms it was about
        cid = frame.get("cid")
        if kind == "error" and isinstance(cid, str) and self.connection.is_parked(cid):
            return  # sent before its room's join was put off: sent again once joined
        self.model.apply(frame)
        if kind == "error" and isinstance(cid, str) and cid in self.connection.refused:
            self.model.fail_pending(cid, self.connection.refused[cid])
        if kind in ("joined", "left") and self.settings is not None and self.interactive:
            self.settings.set_rooms(self.connection.url, self.connection.rooms)
        self.on_change()

    def _drop_rooms(self) -> None:
        """Close the windows of rooms the server refused, saying why (and what is lost)."""
        dropped, self.connection.dropped_rooms = self.connection.dropped_rooms, {}
        for room, reason in dropped.items():
            name = "#" + room
            window = self.model.windows.get(name)
            unsent = list(window.pending) if window is not None else []
            for cid in unsent:
                self.connection.cancel(cid)
            self.model.close(name)
            lost = f"; {len(unsent)} unsent line(s) there were not sent" if unsent else ""
            text = f"not in {name}: the server refused it ({reason}){lost}"
            self.refused_commands.append(text)
            self.model.notice(text, tone="error")
            if self.model.active != SERVER_WINDOW:
                self.model.notice(text, SERVER_WINDOW, tone="error")
        if self.settings is not None and self.interactive:
            self.settings.set_rooms(self.connection.url, self.connection.rooms)

    def status(self, status: Status) -> None:
        self.retry_at = status.retry_at
        self.model.status = status.state.value
        if status.state != LinkState.CONNECTED:
            self.model.stop_loading()
        if status.refusal is not None:
            self._refused(status)
        elif status.state == LinkState.CONNECTED:
            if self._offline_since is not None:
                away = _duration(time.monotonic() - self._offline_since)
                self.model.everywhere(f"reconnected (offline for {away})")
            self._offline_since = None
            self._was_connected = True
        elif status.state == LinkState.RECONNECTING and status.detail:
            wait = ""
            if status.retry_at is not None:
                wait = f" in {max(1, round(status.retry_at - time.monotonic()))}s"
            if self._offline_since is None:
                self._offline_since = time.monotonic()
                verb = "disconnected" if self._was_connected else "cannot connect"
                self.model.everywhere(
                    f"{verb}: {status.detail}; reconnecting{wait} (/reconnect: now)"
                )
            else:
                text = f"still offline: {status.detail}; next try{wait}"
                self.model.notice(text, SERVER_WINDOW, "link")
        self.on_change()

    def _refused(self, status: Status) -> None:
        refusal = status.refusal
        assert refusal is not None
        nick, code = refusal.nick, refusal.code
        model = self.model
        if code == "nick_in_use":
            if not self.interactive:
                return

            def take_over() -> None:
                self._change_nick(nick, takeover=True)

            self.ask(
                f"{nick} is connected elsewhere: take over? (y/n)",
                take_over,
                lambda: model.notice(
                    f"you stay {model.nick}"
                    if refusal.during_session
                    else "not taken over: /nick OTHER to use another nick, or /reconnect"
                    " to be asked again",
                    tone="error",
                ),
            )
        elif code == "nick_taken":
            where = "" if refusal.during_session else " (this client is offline)"
            model.notice(
                f"the nick {nick} is registered to someone else{where}: choose another "
                "with /nick NAME",
                tone="error",
            )
        elif code == "replaced":
            self._offline_since = None
            why = refusal.message.removeprefix("replaced: ")
            model.notice(
                f"this client was replaced: {why}. It is offline now; "
                f"/reconnect takes {nick} back (it asks first).",
                tone="error",
            )
        elif code == "secret_store":
            model.notice(f"{refusal.message}. Fix it, then /reconnect.", tone="error")
        elif code == "new_url":
            if self.interactive:
                self._ask_new_url(nick, refusal.message, during=refusal.during_session)
            return
        else:
            model.notice(f"{refusal.message} ({code})", tone="error")
        if model.active != SERVER_WINDOW and code != "nick_in_use":
            model.notice(f"{code}: {refusal.message}", SERVER_WINDOW, tone="error")

    def _ask_new_url(self, nick: str, why: str, *, during: bool) -> None:
        """Ask once whether this URL is the server the nick's secret belongs to (any server
        can announce another's epoch); yes is remembered for that secret."""
        model = self.model

        def trust() -> None:
            try:
                self.connection.trust_url(nick)
            except SecretStoreError as exc:
                model.notice(f"{exc}: the nick was not claimed", tone="error")
                return
            if during:
                self._change_nick(nick, takeover=False)
            else:
                self.connection.reconnect_now()

        def refuse() -> None:
            model.notice(
                f"{nick}'s secret was not sent: /nick OTHER to use another nick here"
                + ("" if during else ", or /reconnect to be asked again"),
                tone="error",
            )

        self.ask(f"{why}. Trust {self.connection.url} for {nick}? (y/n)", trust, refuse)

    def status_text(self) -> str:
        if self.model.status == LinkState.RECONNECTING and self.retry_at is not None:
            seconds = max(0, round(self.retry_at - time.monotonic()))
            return f"reconnecting in {seconds}s"
        return self.model.status

    # --- questions -----------------------------------------------------------------------

    def ask(self, text: str, on_yes: Callable[[], None], on_no: Callable[[], None]) -> None:
        self.question = Question(text, on_yes, on_no)
        self.model.notice(text, tone="error")
        self.on_change()

    def answer(self, yes: bool) -> None:
        question, self.question = self.question, None
        if question is not None:
            (question.on_yes if yes else question.on_no)()
        self.on_change()

    def undelivered(self) -> int:
        return len(self.connection.outbox)

    def request_quit(self, typed: str = "") -> None:
        """Quit, after asking if typed text or undelivered messages would be lost."""
        losses = []
        if (count := self.undelivered()) and self.interactive:
            losses.append(f"{count} message{'s are' if count > 1 else ' is'} not delivered yet")
        if typed.strip():
            losses.append("the line you are typing would be lost")
        if not losses or not self.interactive:
            self.on_quit()
            return
        self.ask(f"quit? {' and '.join(losses)} (y/n)", self.on_quit, lambda: None)

    # --- from the user -----------------------------------------------------------------

    def submit(self, line: str) -> bool:
        """Act on a typed line; False if it was refused as it is (keep it for editing)."""
        parsed = parse(line)
        accepted = True
        if isinstance(parsed, Say):
            accepted = self._say(parsed.text, self.model.active)
        elif isinstance(parsed, Invalid):
            self.model.notice(parsed.error, tone="error")
            accepted = False
        elif isinstance(parsed, Command):
            result = getattr(self, "_" + parsed.name[1:])(parsed.args)
            accepted = result is not False
        self.on_change()
        return accepted

    def completions(self) -> list[str]:
        words = [*NAMES, *ALIASES]
        for name, window in self.model.windows.items():
            if name not in (SERVER_WINDOW, HELP_WINDOW):
                words.append(name)
            words.extend(window.members)
        return list(dict.fromkeys(words))

    def load_older(self, name: str) -> bool:
        """Fetch the page before the oldest line of a window (PgUp at its top)."""
        window = self.model.windows.get(name)
        if window is None or not window.is_conversation or window.loading:
            return False
        if window.more is False or not self.connection.synced:
            return False
        frame: Frame = {"type": "history", "limit": SCROLL_PAGE, "ref": "scroll"}
        frame.update(_target(name))
        if (before := window.history_before()) is not None:
            frame["before"] = before
        window.loading = self.connection.request(frame)
        return window.loading

    def _say(self, text: str, window: str, action: bool = False) -> bool:
        try:
            if window.startswith("#"):
                cid = self.connection.send_message(text, room=window[1:], action=action)
            elif window.startswith("@"):
                cid = self.connection.send_message(text, to=window[1:], action=action)
            else:
                self.model.notice(
                    "this window is not a conversation: /join a room or /msg a nick",
                    tone="error",
                )
                return False
        except MessageRefused as refused:
            self.model.notice(f"not sent: {refused}", tone="error")
            self.refused_lines += 1
            return False
        self.model.add_pending(cid, window, text, action)
        return True

    def _help(self, _: str) -> None:
        if HELP_WINDOW not in self.model.windows:
            for line in help_lines():
                self.model.notice(line, HELP_WINDOW, tone="help")
        self.model.switch(HELP_WINDOW)

    def _nick(self, args: str) -> bool:
        if not is_valid_nick(args):
            self.model.notice("a nick is 1-24 of A-Z a-z 0-9 _ -, not starting with -")
            return False
        return self._change_nick(args, takeover=False)

    def _change_nick(self, nick: str, *, takeover: bool) -> bool:
        try:
            now = self.connection.change_nick(nick, takeover=takeover)
        except SecretStoreError as exc:
            self.model.notice(f"{exc}: the nick was not claimed", tone="error")
            return False
        except NewUrl as exc:
            self._ask_new_url(nick, str(exc), during=True)
            return False
        if not now:
            unsent = self.undelivered()
            lines = f"{unsent} unsent lines, which are" if unsent > 1 else "unsent line, which is"
            after = f" (after your {lines} sent as {self.model.nick}, as shown)" if unsent else ""
            self.model.notice(f"offline: you will ask for the nick {nick} once reconnected{after}")
        elif self.connection.welcomed:
            self.model.notice(f"asking the server for the nick {nick}…")
        else:
            self.model.notice(f"connecting as {nick}…")
        return True

    def _room(self, args: str) -> str | None:
        room = normalize_room(args or self.model.active)
        if room is None:
            self.model.notice("a room name is 1-32 of a-z 0-9 _ -", tone="error")
        return room

    def _join(self, args: str) -> bool:
        room = self._room(args)
        if room is None:
            self.refused_commands.append(f"not joined: {args or '(no room)'} is not a room name")
            return False
        try:
            self.connection.join(room)
        except JoinRefused as refused:
            self.model.notice(f"not joined #{room}: {refused}", tone="error")
            self.refused_commands.append(f"not joined #{room}: {refused}")
            return False
        self.model.switch("#" + room)
        return True

    def _leave(self, args: str) -> bool:
        room = self._room(args)
        if room is None or self._unsent_in("#" + room):
            return False
        self.connection.leave(room)
        self.model.close("#" + room)
        return True

    def _unsent_in(self, name: str) -> bool:
        """True (and say so) when closing the window would throw typed lines away."""
        window = self.model.windows.get(name)
        if window is None or not window.pending:
            return False
        count = len(window.pending)
        self.model.notice(
            f"{name} has {count} unsent line{'s' if count > 1 else ''}: wait until "
            f"{'they are' if count > 1 else 'it is'} delivered, or /cancel all there first",
            tone="error",
        )
        return True

    def _close(self, _: str) -> bool:
        active = self.model.active
        if self._unsent_in(active):
            return False
        if active == SERVER_WINDOW:
            self.model.notice("the server window stays open (Alt-1 always brings you here)")
        elif active.startswith("#"):
            return self._leave(active[1:])
        else:
            self.model.close(active)
        return True

    def _rooms(self, args: str) -> None:
        frame: Frame = {"type": "rooms", "limit": 100}
        if args:
            after = self._room(args)
            if after is None:
                return
            frame["after"] = after
        self._request(frame)

    def _who(self, args: str) -> None:
        if args:
            room = self._room(args)
            if room is not None:
                self._request({"type": "who", "room": room})
        else:
            self._request({"type": "who"})

    def _names(self, args: str) -> None:
        if not args and not self.model.active.startswith("#"):
            self.model.notice("usage: /names ROOM (or use it in a room)", tone="error")
            return
        self._who(args or self.model.active)

    def _whois(self, args: str) -> None:
        nick = args.split()[0]
        rooms = [
            name
            for name, window in self.model.windows.items()
            if name.startswith("#") and nick_key(nick) in {nick_key(m) for m in window.members}
        ]
        if rooms:
            self.model.notice(f"{nick} is online, in {', '.join(rooms)}")
        else:
            self._request({"type": "who", "ref": f"whois:{nick}"})

    def _window(self, args: str) -> None:
        name = self.model.by_number(int(args))
        if name is None:
            self.model.notice(f"no window {args}: there are {len(self.model.windows)}")
        else:
            self.model.switch(name)

    def _switch(self, args: str) -> None:
        wanted = {"server": SERVER_WINDOW, "*": SERVER_WINDOW, "help": HELP_WINDOW}.get(args)
        candidates = [wanted] if wanted else []
        room = normalize_room(args)  # None for "@nick" too
        if room is not None:
            candidates.append("#" + room)
        if args[0] == "@":
            candidates.append(args)
        elif args[0] != "#":
            candidates.append("@" + args)
        for candidate in candidates:
            if candidate in self.model.windows or candidate.startswith("@"):
                if candidate.startswith("@") and not is_valid_nick(candidate[1:]):
                    continue
                self.model.switch(candidate)
                return
        self.model.notice(f"no window {args}: /join a room or /msg a nick first")

    def _msg(self, args: str) -> bool:
        nick, text = args.split(maxsplit=1)
        if not is_valid_nick(nick):
            self.model.notice(f"{nick!r} is not a valid nick", tone="error")
            return False
        self.model.switch("@" + nick)
        return self._say(text, "@" + nick)

    def _query(self, args: str) -> bool:
        nick, _, text = args.partition(" ")
        if not is_valid_nick(nick):
            self.model.notice(f"{nick!r} is not a valid nick", tone="error")
            return False
        self.model.switch("@" + nick)
        return self._say(text, "@" + nick) if text.strip() else True

    def _me(self, args: str) -> bool:
        return self._say(args, self.model.active, action=True)

    def _history(self, args: str) -> None:
        active = self.model.active
        limit = int(args) if args else 50
        frame: Frame = {"type": "history", "limit": limit, "ref": "history"}
        if active == SERVER_WINDOW:
            frame["direct"] = True
            oldest = [
                w.oldest_id for n, w in self.model.windows.items() if n[:1] == "@" and w.oldest_id
            ]
            if oldest:
                frame["before"] = min(i for i in oldest if i is not None)
            self._request(frame)
            return
        window = self.model.window(active)
        if not window.is_conversation:
            self.model.notice("/history works in a room, a conversation or the server window")
            return
        frame.update(_target(active))
        if (before := window.history_before()) is not None:
            frame["before"] = before
        window.loading = self._request(frame)

    def _clear(self, _: str) -> None:
        self.model.clear(self.model.active)

    def _ignore(self, args: str) -> None:
        if not args:
            listed = ", ".join(sorted(self.model.ignored)) or "nobody"
            self.model.notice(f"ignored: {listed}")
            return
        nick = args.split()[0]
        if not is_valid_nick(nick):
            self.model.notice(f"{nick!r} is not a valid nick", tone="error")
            return
        self.model.ignored.add(nick_key(nick))
        self._save_words("ignore", sorted(self.model.ignored))
        self.model.notice(f"ignoring {nick}: their messages, joins and DMs are hidden")

    def _unignore(self, args: str) -> None:
        key = nick_key(args.split()[0])
        if key not in self.model.ignored:
            self.model.notice(f"{args} is not ignored")
            return
        self.model.ignored.discard(key)
        self._save_words("ignore", sorted(self.model.ignored))
        self.model.notice(f"no longer ignoring {args} (from now on)")

    def _highlight(self, args: str) -> None:
        words = self.model.highlights
        if not args:
            self.model.notice(f"highlights: your nick, {', '.join(words) or 'nothing else'}")
            return
        for word in args.split():
            if word.startswith("-"):
                words[:] = [w for w in words if w.lower() != word[1:].lower()]
            elif word.lower() not in (w.lower() for w in words):
                words.append(word)
        self._save_words("highlight", words)
        self.model.notice(f"highlights: your nick, {', '.join(words) or 'nothing else'}")

    def _away(self, args: str) -> None:
        if args:
            self.model.set_away(args)
            self.model.notice(
                f"you are away ({args}): no bells; mentions and DMs are kept for you. "
                "Others are not told (the server has no away status). /away: back."
            )
            return
        was_away = self.model.away is not None
        missed = self.model.set_away(None)
        if not was_away:
            self.model.notice("you were not away")
            return
        self.model.notice(f"welcome back: {len(missed)} mention(s) and DM(s) while away")
        for entry in missed[-20:]:
            stamp = time.strftime("%H:%M", time.localtime(entry.ts))
            self.model.notice(f"{stamp} {entry.window} <{entry.nick}> {entry.text}")

    def _reconnect(self, _: str) -> None:
        self.model.notice("reconnecting now", SERVER_WINDOW, tone="link")
        self.connection.reconnect_now()

    def _cancel(self, args: str) -> None:
        window = self.model.window(self.model.active)
        cids = list(window.pending)
        if not cids:
            self.model.notice("nothing to cancel here: every line was delivered")
            return
        for cid in cids if args == "all" else cids[-1:]:
            never_sent = self.connection.cancel(cid)
            note = "cancelled"
            if never_sent is False:
                note += " (it had been sent: the server may have stored it)"
            self.model.fail_pending(cid, note)

    def _expand(self, args: str) -> None:
        window = self.model.window(self.model.active)
        collapsed = [e for e in window.lines() if e.collapsed and not e.expanded]
        if not collapsed:
            self.model.notice("nothing is collapsed in this window")
            return
        for entry in collapsed if args == "all" else collapsed[-1:]:
            entry.expanded = True

    def _quit(self, _: str) -> None:
        self.request_quit()

    def _request(self, frame: Frame) -> bool:
        if not self.connection.request(frame):
            self.model.notice("not connected; try again when the status says connected")
            return False
        return True

    def _save_words(self, name: str, words: list[str]) -> None:
        if self.settings is not None:
            self.settings.set_words(name, words)
            if self.settings.problem:
                self.model.notice(self.settings.problem, tone="error")


def _target(window: str) -> Frame:
    return {"room": window[1:]} if window.startswith("#") else {"with": window[1:]}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m {seconds % 60}s"
