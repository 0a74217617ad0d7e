"""Line mode, for when there is no terminal: pipes, scripts, ``docker compose logs``.

Each line read from stdin is a message or a command, exactly as typed in the UI. Each
event is printed as one line: ``12:01:03 #lobby <alice> hi``. Nothing from the network
reaches the output unsanitized, and a body's newlines are shown as ``⏎``. The same lines,
with the date, are what per-window log files (``--log-dir``) hold.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from chat_client.model import SERVER_WINDOW, Entry, EntryKind
from chat_client.sanitize import clean
from chat_protocol.names import ROOM_RE, is_valid_nick


def format_entry(entry: Entry, stamp: str = "%H:%M:%S") -> str | None:
    """One printable line, or None for what line mode does not print (pending sends)."""
    if entry.kind == EntryKind.PENDING:
        return None
    when = time.strftime(stamp, time.localtime(entry.ts))
    where = clean(entry.window)
    text = clean(entry.text)
    if entry.kind == EntryKind.NOTICE:
        return f"{when} {where} -- {text}"
    if entry.kind == EntryKind.GAP:
        return f"{when} {where} ~~ {text}"
    if entry.kind == EntryKind.PRESENCE:
        verb = "joined" if entry.tone == "join" else "left"
        return f"{when} {where} -- {clean(', '.join(entry.added))} {verb}"
    nick = clean(entry.nick)
    said = f"* {nick} {text}" if entry.action else f"<{nick}> {text}"
    if entry.kind == EntryKind.FAILED:
        return f"{when} {where} !! not delivered ({clean(entry.note)}): {said}"
    return f"{when} {where} {said}"


class LinePrinter:
    """A model listener that prints every entry once, flushed, to ``out``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.enabled = True

    def __call__(self, entry: Entry) -> None:
        if not self.enabled or (entry.tone == "link" and entry.window != SERVER_WINDOW):
            return  # the link's state is said once, not once per window
        line = format_entry(entry)
        if line is not None:
            self.out.write(line + "\n")
            self.out.flush()


class WindowLogs:
    """A model listener that appends each window's lines to ``<dir>/<window>.log``.

    Rooms are ``#room.log``, conversations ``@nick.log``, the server window
    ``server.log`` (names are limited to ``a-z A-Z 0-9 _ -``, so they are safe paths).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.problem: str | None = None

    def __call__(self, entry: Entry) -> None:
        name = "server" if entry.window == SERVER_WINDOW else entry.window
        if not _safe(name):
            return  # the help window, or a name no server should send
        line = format_entry(entry, "%Y-%m-%d %H:%M:%S")
        if line is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with (self.directory / f"{name}.log").open("a", encoding="utf-8") as log:
                log.write(line + "\n")
        except OSError as exc:
            self.problem = f"cannot write the log in {self.directory}: {exc.strerror or exc}"


def _safe(name: str) -> bool:
    if name.startswith("#"):
        return ROOM_RE.fullmatch(name[1:]) is not None
    if name.startswith("@"):
        return is_valid_nick(name[1:])
    return name == "server"
