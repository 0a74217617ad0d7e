"""Turns what the user types into protocol actions, and server frames into the model.

The one place that knows both the connection and the model; the UIs only get
``submit`` (a line typed) and ``completions`` (words for Tab).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from chat_client.commands import NAMES, Command, Invalid, Say, help_lines, parse
from chat_client.connection import ChatConnection, Frame, LinkState, Status
from chat_client.model import SERVER_WINDOW, ChatModel
from chat_protocol.names import is_valid_nick, normalize_room


class Controller:
    def __init__(self, model: ChatModel, connection: ChatConnection) -> None:
        self.model = model
        self.connection = connection
        self.on_change: Callable[[], None] = lambda: None
        self.on_quit: Callable[[], None] = lambda: None
        self.retry_at: float | None = None

    # --- from the network --------------------------------------------------------------

    def frame(self, frame: Frame) -> None:
        self.model.apply(frame)
        self.on_change()

    def status(self, status: Status) -> None:
        self.retry_at = status.retry_at
        self.model.status = status.state.value
        if status.state in (LinkState.RECONNECTING, LinkState.OFFLINE) and status.detail not in (
            "",
            "quit",
        ):
            self.model.notice(f"{status.state.value}: {status.detail}", SERVER_WINDOW)
        self.on_change()

    def status_text(self) -> str:
        if self.model.status == LinkState.RECONNECTING and self.retry_at is not None:
            seconds = max(0, round(self.retry_at - time.monotonic()))
            return f"reconnecting in {seconds}s"
        return self.model.status

    # --- from the user -----------------------------------------------------------------

    def submit(self, line: str) -> None:
        parsed = parse(line)
        if isinstance(parsed, Say):
            self._say(parsed.text, self.model.active)
        elif isinstance(parsed, Invalid):
            self.model.notice(parsed.error)
        elif isinstance(parsed, Command):
            getattr(self, "_" + parsed.name[1:])(parsed.args)
        self.on_change()

    def completions(self) -> list[str]:
        words = list(NAMES)
        for name, window in self.model.windows.items():
            if name != SERVER_WINDOW:
                words.append(name)
            words.extend(window.members)
        return list(dict.fromkeys(words))

    def _say(self, text: str, window: str, action: bool = False) -> None:
        if window.startswith("#"):
            cid = self.connection.send_message(text, room=window[1:], action=action)
        elif window.startswith("@"):
            cid = self.connection.send_message(text, to=window[1:], action=action)
        else:
            self.model.notice("this window is for server notices: /join a room or /msg a nick")
            return
        self.model.add_pending(cid, window, text, action)

    def _help(self, _: str) -> None:
        for line in help_lines():
            self.model.notice(line)

    def _nick(self, args: str) -> None:
        if not is_valid_nick(args):
            self.model.notice("a nick is 1-24 of A-Z a-z 0-9 _ -, not starting with -")
            return
        self.connection.change_nick(args)

    def _room(self, args: str) -> str | None:
        room = normalize_room(args or self.model.active)
        if room is None:
            self.model.notice("a room name is 1-32 of a-z 0-9 _ -")
        return room

    def _join(self, args: str) -> None:
        room = self._room(args)
        if room is not None:
            self.connection.join(room)
            self.model.switch("#" + room)

    def _leave(self, args: str) -> None:
        room = self._room(args)
        if room is not None:
            self.connection.leave(room)
            self.model.close("#" + room)

    def _rooms(self, _: str) -> None:
        self._request({"type": "rooms"})

    def _who(self, args: str) -> None:
        if args:
            room = self._room(args)
            if room is not None:
                self._request({"type": "who", "room": room})
        else:
            self._request({"type": "who"})

    def _switch(self, args: str) -> None:
        name = args if args[0] in "#@" else None
        candidates = [name] if name else ["#" + args.lower(), "@" + args]
        for candidate in candidates:
            if candidate in self.model.windows or (name and candidate.startswith("@")):
                self.model.switch(candidate)
                return
        self.model.notice(f"no window {args}: /join a room or /msg a nick first")

    def _msg(self, args: str) -> None:
        nick, text = args.split(maxsplit=1)
        if not is_valid_nick(nick):
            self.model.notice(f"{nick!r} is not a valid nick")
            return
        self.model.switch("@" + nick)
        self._say(text, "@" + nick)

    def _me(self, args: str) -> None:
        self._say(args, self.model.active, action=True)

    def _history(self, args: str) -> None:
        active = self.model.active
        window = self.model.window(active)
        frame: Frame = {"type": "history", "limit": int(args) if args else 50}
        if active.startswith("#"):
            frame["room"] = active[1:]
        elif active.startswith("@"):
            frame["with"] = active[1:]
        else:
            self.model.notice("/history works in a room or a conversation")
            return
        before = window.history_before()
        if before is not None:
            frame["before"] = before
        self._request(frame)

    def _quit(self, _: str) -> None:
        self.on_quit()

    def _request(self, frame: Frame) -> None:
        if not self.connection.request(frame):
            self.model.notice("not connected; try again when the status says connected")
