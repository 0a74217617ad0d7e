"""What a line typed by the user means: a message, or a slash command.

The tables here are the one source for parsing, Tab completion and ``/help``: a command,
alias or key that is not listed here does not exist for the user.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Spec:
    usage: str  # "/join ROOM"
    help: str
    aliases: tuple[str, ...] = ()
    needs_args: bool = False

    @property
    def name(self) -> str:
        return self.usage.split()[0]


SPECS: tuple[Spec, ...] = (
    Spec("/help", "this help, in a window of its own", ("/h",)),
    Spec("/join ROOM", "join a room and show it", ("/j",), needs_args=True),
    Spec("/leave [ROOM]", "leave a room (default: this one)", ("/part",)),
    Spec("/close", "close this window (a room is left; the server window stays)", ("/wc",)),
    Spec("/msg NICK TEXT", "send a direct message; opens the @NICK window", ("/m",), True),
    Spec("/query NICK [TEXT]", "open the @NICK conversation (and say TEXT)", ("/q",), True),
    Spec("/me TEXT", "an action: * you TEXT", needs_args=True),
    Spec("/who [ROOM]", "who is online; with ROOM, who is in it", ("/w",)),
    Spec("/names [ROOM]", "who is in this room (or ROOM)", ("/n",)),
    Spec("/whois NICK", "is NICK online, and in which of your rooms", ("/wi",), True),
    Spec("/rooms [FROM]", "list rooms, 100 at a time (from FROM on)", ("/list",)),
    Spec("/nick NAME", "change nick (asks before taking over your own live nick)", (), True),
    Spec("/history [N]", "load N older messages here (default 50; server window: DMs)"),
    Spec("/clear", "clear this window (PgUp loads the history again)", ("/c",)),
    Spec("/ignore [NICK]", "hide NICK's messages, joins and DMs; alone: list ignored"),
    Spec("/unignore NICK", "stop ignoring NICK", (), True),
    Spec(
        "/highlight [[-]WORD]",
        "highlight (and ring for) WORD, or stop; alone: list",
        ("/hilight",),
    ),
    Spec("/away [REASON]", "away here: no bells, mentions and DMs kept; /away alone: back"),
    Spec("/window N", "show window N (also Alt-1 .. Alt-9, Alt-0 for 10)", ("/win",), True),
    Spec("/switch NAME", "show #room, @nick, 'server' or 'help'", ("/s",), True),
    Spec("/reconnect", "connect again now, without waiting for the next try"),
    Spec("/cancel [all]", "stop sending the newest undelivered line here (or all of them)"),
    Spec("/expand [all]", "show the newest collapsed long message here in full (or all)"),
    Spec("/quit", "leave the chat (asks if a message is not delivered yet)", ("/exit", "/bye")),
)

#: Keys of the full-screen UI, as /help lists them (tui.py binds them).
KEYS: tuple[tuple[str, str], ...] = (
    ("Enter", "send the line; Alt-Enter: a new line in the same message"),
    ("Tab", "complete a nick, room, window or command (again: the next one)"),
    ("Up / Down", "the lines you typed before"),
    ("PgUp / PgDn", "scroll a page; at the top, older history loads by itself"),
    ("Alt-Home / Alt-End", "top / bottom (also Ctrl-Home / Ctrl-End, Home / End on an empty line)"),
    ("Alt-1 .. Alt-9, Alt-0", "window 1 .. 10 (window 1 is the server window)"),
    ("Alt-Left / Alt-Right", "previous / next window (also Alt-Up / Alt-Down, Ctrl-P / Ctrl-N)"),
    ("Alt-A", "the next window with activity: mentions first, then DMs, then messages"),
    ("y / n", "answer a question shown on the input line"),
    ("Ctrl-U, Ctrl-W", "clear the line, delete a word"),
    ("Ctrl-L", "redraw the screen"),
    ("Ctrl-C, Ctrl-D", "quit (asks first if typed text or undelivered lines would be lost)"),
)

#: Said in /help about keys in Docker.
DOCKER_NOTE = (
    "In Docker (compose run / attach) Ctrl-P is Docker's detach prefix and waits for the "
    "next key: use the Alt keys. Detach from an attached replica with Ctrl-P Ctrl-Q."
)

BY_NAME = {spec.name: spec for spec in SPECS}
ALIASES = {alias: spec.name for spec in SPECS for alias in spec.aliases}
NAMES = [spec.name for spec in SPECS]


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # canonical, e.g. "/join"
    args: str


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class Invalid:
    error: str


def parse(line: str) -> Command | Say | Invalid | None:
    text = line.rstrip("\n")
    if not text.strip():
        return None
    if text.startswith("//"):  # a message that starts with a slash
        return Say(text[1:])
    if not text.startswith("/"):
        return Say(text)
    name, _, args = text.partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    spec = BY_NAME.get(name)
    if spec is None:
        return Invalid(f"unknown command {name}; /help lists them")
    args = args.strip()
    if spec.needs_args and not args:
        return Invalid(f"usage: {spec.usage}")
    if name == "/msg" and len(args.split(maxsplit=1)) < 2:
        return Invalid("usage: /msg NICK TEXT")
    if name == "/history" and args and not (args.isdigit() and 1 <= int(args) <= 200):
        return Invalid("usage: /history [N], N from 1 to 200")
    if name == "/window" and not args.isdigit():
        return Invalid("usage: /window N")
    return Command(name, args)


def help_lines() -> list[str]:
    """Every command with its aliases, every key: the text of the help window.

    Each entry is "name  description", the description starting after a run of at
    least two spaces: the help window wraps a long description under itself.
    """
    names = {
        spec: spec.usage + (f" ({', '.join(spec.aliases)})" if spec.aliases else "")
        for spec in SPECS
    }
    width = max(map(len, names.values()))
    lines = ["Commands (other lines are said here; // starts a line with /):"]
    lines += [f"  {names[spec].ljust(width)}  {spec.help}" for spec in SPECS]
    key_width = max(len(key) for key, _ in KEYS)
    lines.append("Keys:")
    lines += [f"  {key.ljust(key_width)}  {text}" for key, text in KEYS]
    lines.append(DOCKER_NOTE)
    lines.append("/close or Alt-Left leaves this window.")
    return lines
