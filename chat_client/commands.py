"""What a line typed by the user means: a message, or a slash command."""

from __future__ import annotations

from dataclasses import dataclass

COMMANDS: dict[str, str] = {
    "/help": "this list",
    "/nick NAME": "change nick",
    "/join ROOM": "join a room and switch to it",
    "/leave [ROOM]": "leave a room (default: this one)",
    "/rooms": "list rooms",
    "/switch NAME": "show a room (#dev) or a conversation (@bob); also Ctrl-N / Ctrl-P",
    "/who [ROOM]": "who is in a room; without ROOM, who is online",
    "/msg NICK TEXT": "direct message",
    "/me TEXT": "action",
    "/history [N]": "load N older messages here (default 50)",
    "/quit": "leave the chat",
}
NAMES = [usage.split()[0] for usage in COMMANDS]
ALIASES = {"/part": "/leave", "/s": "/switch", "/q": "/quit", "/exit": "/quit", "/w": "/who"}


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
    if name not in NAMES:
        return Invalid(f"unknown command {name}; /help lists them")
    args = args.strip()
    needs = {"/nick", "/join", "/switch", "/msg", "/me"}
    if name in needs and not args:
        usage = next(u for u in COMMANDS if u.split()[0] == name)
        return Invalid(f"usage: {usage}")
    if name == "/msg" and len(args.split(maxsplit=1)) < 2:
        return Invalid("usage: /msg NICK TEXT")
    if name == "/history" and args and not (args.isdigit() and 1 <= int(args) <= 200):
        return Invalid("usage: /history [N], N from 1 to 200")
    return Command(name, args)


def help_lines() -> list[str]:
    width = max(map(len, COMMANDS))
    return [f"{usage.ljust(width)}  {text}" for usage, text in COMMANDS.items()]
