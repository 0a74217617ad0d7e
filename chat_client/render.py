"""Entries as styled screen lines: time stamp, nick, body wrapped at word boundaries.

Everything from the network goes through :func:`~chat_client.sanitize.clean` here and
becomes plain ``(style, text)`` fragments: never ``ANSI()`` or ``HTML()``, which would
interpret it. Widths are terminal cells (``wcwidth``): wide characters and combining
marks wrap where the terminal will put them.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass

import wcwidth
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.formatted_text.utils import split_lines
from prompt_toolkit.utils import get_cwidth

from chat_client.model import Entry, EntryKind
from chat_client.sanitize import clean
from chat_protocol.names import nick_key

#: A message taller than this many screen lines is shown cut short (``/expand``).
COLLAPSE_LINES = 12

NICK_COLOURS = [
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansibrightred",
    "ansibrightgreen",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
]

STYLES = {
    "time": "ansibrightblack",
    "notice": "ansibrightblack italic",
    "notice.error": "ansired bold",
    "notice.link": "ansiyellow",
    "notice.help": "",
    "presence": "ansibrightblack",
    "gap": "ansiyellow bold",
    "day": "ansicyan",
    "marker": "ansibrightblack",
    "pending": "ansibrightblack",
    "failed": "ansired",
    "mention": "bold ansibrightmagenta",
    "self": "bold underline",
    "collapsed": "ansicyan",
}


def nick_style(nick: str) -> str:
    """The same colour for a nick on every screen and every run."""
    return "fg:" + NICK_COLOURS[zlib.crc32(nick_key(nick).encode()) % len(NICK_COLOURS)]


def cells(text: str) -> int:
    return max(0, wcwidth.width(text))


def close_lines(fragments: StyleAndTextTuples) -> StyleAndTextTuples:
    """Fragments in which no line ends with a zero-width character: such a line gets a space.

    prompt_toolkit merges a zero-width character (a combining mark such as U+0301, an
    enclosing one such as U+20DD, a ZWJ) into the cell before it, but also leaves it in the
    next cell, where the next character normally overwrites it. At the end of a line
    nothing does, and that cell is drawn too: ``qá`` reaches the terminal as ``qá́``. A
    space after the mark takes that cell. It costs nothing at the right edge either: a
    window that does not wrap drops what does not fit, the space as much as the stray.
    """
    out: StyleAndTextTuples = []
    for n, line in enumerate(split_lines(fragments)):
        if n:
            out.append(("", "\n"))
        out += line
        last = next((text for _, text, *_ in reversed(line) if text), "")
        if last and get_cwidth(last[-1]) == 0:
            out.append(("", " "))
    return out


def wrap(text: str, first: int, rest: int) -> list[str]:
    """Cut text into lines at word boundaries: ``first`` cells wide, then ``rest``.

    Newlines start new lines; a line's leading indentation is kept (pasted code stays
    readable); a word longer than a line is cut.
    """
    first, rest = max(1, first), max(1, rest)
    out: list[str] = []
    for n, line in enumerate(text.split("\n")):
        width = first if n == 0 else rest
        body = line.lstrip(" ")
        lead = " " * min(len(line) - len(body), max(0, width - 1))
        if not body:
            out.append("")
            continue
        pad = " " * max(0, rest - width)  # the first line is narrower by the prefix
        pieces = wcwidth.wrap(
            body,
            rest,
            initial_indent=pad + lead,
            subsequent_indent=lead if cells(lead) < rest // 2 else "",
            break_on_hyphens=False,
            control_codes="ignore",
        )
        if pieces and pad:
            pieces[0] = pieces[0][len(pad) :]
        out += pieces or [""]
    return out


@dataclass(frozen=True, slots=True)
class Look:
    """How entries are drawn: width, seconds in stamps, who "you" are."""

    width: int
    seconds: bool = False


def stamp(ts: float, seconds: bool) -> str:
    return time.strftime("%H:%M:%S" if seconds else "%H:%M", time.localtime(ts))


def render_entry(entry: Entry, look: Look) -> list[StyleAndTextTuples]:
    """An entry as screen lines (several for newlines, wrapping or a collapsed tail)."""
    key = (look, entry.kind, entry.text, entry.note, entry.expanded, entry.nick)
    cached = getattr(entry, "rendered", None)
    if cached is not None and cached[0] == key:
        lines: list[StyleAndTextTuples] = cached[1]
        return lines
    lines = _render(entry, look)
    entry.rendered = (key, lines)
    return lines


def _render(entry: Entry, look: Look) -> list[StyleAndTextTuples]:
    if entry.tone == "help" and entry.kind == EntryKind.NOTICE:
        return _help(clean(entry.text), look.width)
    prefix: StyleAndTextTuples = [("class:time", stamp(entry.ts, look.seconds) + " ")]
    suffix: StyleAndTextTuples = []
    if entry.kind in (EntryKind.NOTICE, EntryKind.GAP, EntryKind.PRESENCE):
        if entry.kind == EntryKind.GAP:
            style, marker = "class:gap", "~~ "
        elif entry.kind == EntryKind.PRESENCE:
            style, marker = "class:presence", "-> " if entry.tone == "join" else "<- "
        else:
            style, marker = f"class:notice.{entry.tone}", "-- "
        prefix.append((style, marker))
        body, body_style = clean(entry.text), style
    else:
        nick = clean(entry.nick)
        who = "class:self" if entry.own else nick_style(nick)
        if entry.action:
            prefix += [("", "* "), (who, nick), ("", " ")]
        else:
            prefix += [("", "<"), (who, nick), ("", "> ")]
        body = clean(entry.text, keep_newlines=True)
        body_style = "class:mention" if entry.mention else ""
        if entry.kind == EntryKind.PENDING:
            body_style = "class:pending"
            note = f": {clean(entry.note)}" if entry.note else ""
            suffix = [("class:pending", f"  (sending…{note})")]
        elif entry.kind == EntryKind.FAILED:
            body_style = "class:failed"
            suffix = [("class:failed", f"  ✗ not delivered: {clean(entry.note)}")]
    width = max(10, look.width)
    head = sum(cells(text) for _, text, *_ in prefix)
    indent = head if head <= width // 2 else len(prefix[0][1])
    # prompt_toolkit drops a zero-width character whose letter is in the window's last
    # column (it merges marks only into cells it may write): such text stops a column short.
    fit = width - 1 if any(get_cwidth(c) == 0 for c in body) else width
    pieces = wrap(body, fit - head, fit - indent)
    entry.collapsed = False
    if len(pieces) > COLLAPSE_LINES and not entry.expanded:
        hidden = len(pieces) - (COLLAPSE_LINES - 1)
        pieces = pieces[: COLLAPSE_LINES - 1]
        entry.collapsed = True
        tail = f"… {hidden} more lines (/expand shows them)"
    else:
        tail = ""
    lines: list[StyleAndTextTuples] = []
    for n, piece in enumerate(pieces):
        lead = prefix if n == 0 else [("", " " * indent)]
        lines.append([*lead, (body_style, piece)])
    if tail:
        lines.append([("", " " * indent), ("class:collapsed", tail)])
    if suffix:
        last = lines[-1]
        if sum(cells(t) for _, t, *_ in [*last, *suffix]) <= width:
            last += suffix
        else:
            lines.append([("", " " * indent), *suffix])
    return lines


def _help(text: str, width: int) -> list[StyleAndTextTuples]:
    """A help line: a description after "name  " wraps under the description."""
    found = re.match(r"\s+\S.*?\s{2,}", text)
    column = found.end() if found and found.end() <= width // 2 else 0
    pieces = wrap(text[column:], width - column, width - column)
    out = [text[:column] + pieces[0], *(" " * column + piece for piece in pieces[1:])]
    return [[("class:notice.help", line)] for line in out]


def day_line(ts: float, width: int) -> StyleAndTextTuples:
    """The line irssi calls "Day changed": between two days' messages."""
    return [("class:day", _rule(time.strftime("%A %d %B %Y", time.localtime(ts)), width))]


def marker_line(text: str, width: int) -> StyleAndTextTuples:
    return [("class:marker", _rule(text, width))]


def _rule(text: str, width: int) -> str:
    text = f" {text} "
    left = max(2, (width - cells(text)) // 2)
    right = max(2, width - left - cells(text))
    return "─" * left + text + "─" * right
