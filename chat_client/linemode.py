"""Line mode, for when there is no terminal: pipes, scripts, ``docker compose logs``.

Each line read from stdin is a message or a command, exactly as typed in the UI. Each
event is printed as one line: ``12:01:03 #lobby <alice> hi``. Nothing from the network
reaches the output unsanitized, and a body's newlines are shown as ``⏎``.
"""

from __future__ import annotations

import time
from typing import TextIO

from chat_client.model import Entry, EntryKind
from chat_client.sanitize import clean


def format_entry(entry: Entry) -> str | None:
    """One printable line, or None for what line mode does not print (pending sends)."""
    if entry.kind == EntryKind.PENDING:
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.ts))
    where = clean(entry.window)
    text = clean(entry.text)
    if entry.kind == EntryKind.NOTICE:
        return f"{stamp} {where} -- {text}"
    if entry.kind == EntryKind.GAP:
        return f"{stamp} {where} ~~ {text}"
    nick = clean(entry.nick)
    if entry.action:
        return f"{stamp} {where} * {nick} {text}"
    return f"{stamp} {where} <{nick}> {text}"


class LinePrinter:
    """A model listener that prints every entry once, flushed, to ``out``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.enabled = True

    def __call__(self, entry: Entry) -> None:
        if not self.enabled:
            return
        line = format_entry(entry)
        if line is not None:
            self.out.write(line + "\n")
            self.out.flush()
