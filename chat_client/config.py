"""Client configuration: the only place that reads flags and the environment."""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chat_protocol import DEFAULT_ROOM
from chat_protocol.limits import MAX_ROOMS
from chat_protocol.names import is_valid_nick, normalize_room


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str
    nick: str
    rooms: tuple[str, ...]
    state_dir: Path
    mode: str  # auto, tui or line
    demo: bool
    demo_interval: float
    trace: bool
    ping_interval: float
    ping_timeout: float
    probe: int = 0
    probe_interval: float = 0.2
    rooms_given: bool = True  # False: the default; the UI may use the remembered rooms
    takeover: bool = False
    wait: float = 30.0
    seconds: bool = False
    title: bool = False
    log_dir: Path | None = None


#: Exit statuses (line mode), as ``--help`` lists them.
EXIT_UNDELIVERED = 3
EXIT_NICK = 4
EXIT_STATE = 5

EPILOG = f"""\
Each flag can also be set by the environment variable in brackets.

exit status:
  0  everything typed or piped was acknowledged by the server (stored)
  2  bad arguments
  {EXIT_UNDELIVERED}  a message was not delivered: refused, cancelled, or not acknowledged
     within --wait seconds (the server unreachable, say); stderr says which
  {EXIT_NICK}  the nick cannot be used: registered to someone else (no secret for it here),
     connected elsewhere (see --takeover), or invalid
  {EXIT_STATE}  the nick's secret cannot be stored in the state directory
"""


def in_container() -> bool:
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def default_nick(env: Mapping[str, str]) -> str:
    """In a container, from the hostname (so replicas differ); else the login name."""
    if in_container():
        raw = "client-" + socket.gethostname()[:8]
    else:
        raw = env.get("USER") or env.get("USERNAME") or "guest"
    nick = re.sub(r"[^A-Za-z0-9_-]", "-", raw)[:24].lstrip("-")
    return nick if is_valid_nick(nick) else "guest"


def default_state_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "compose-chat"


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="chat-client",
        description=(
            "compose-chat terminal client. Full-screen when run in a terminal; line mode "
            "(one event per line, one message or /command per input line) otherwise."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=env.get("CHAT_URL", "ws://127.0.0.1:8765"),
        help="server WebSocket URL [CHAT_URL, default ws://127.0.0.1:8765]",
    )
    parser.add_argument(
        "--nick",
        default=env.get("CHAT_NICK") or default_nick(env),
        help="your nick [CHAT_NICK; default: client-<hostname> in a container, else $USER]",
    )
    parser.add_argument(
        "--rooms",
        default=env.get("CHAT_ROOMS"),
        help=(
            f"comma-separated rooms to join [CHAT_ROOMS; default: {DEFAULT_ROOM}, or in the "
            "full-screen UI the rooms you were in last time]"
        ),
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(env["CHAT_STATE_DIR"])
        if env.get("CHAT_STATE_DIR")
        else default_state_dir(env),
        help="where nick secrets are kept [CHAT_STATE_DIR, default ~/.config/compose-chat]",
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "tui", "line"),
        default=env.get("CHAT_MODE", "auto"),
        help="auto: full-screen if stdin and stdout are terminals [CHAT_MODE, default auto]",
    )
    parser.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=_flag(env.get("CHAT_DEMO", "0")),
        help=(
            "demo behaviour for scaled containers: announce, post a line every interval, "
            "answer !ping; in a terminal, Enter opens the full-screen UI [CHAT_DEMO, default off]"
        ),
    )
    parser.add_argument(
        "--demo-interval",
        type=float,
        default=float(env.get("CHAT_DEMO_INTERVAL", "15")),
        help="seconds between demo lines [CHAT_DEMO_INTERVAL, default 15]",
    )
    parser.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=_flag(env.get("CHAT_TRACE", "0")),
        help="show every protocol frame sent (>) and received (<) [CHAT_TRACE, default off]",
    )
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=float(env.get("CHAT_PING_INTERVAL", "20")),
        help="seconds between keepalive pings [CHAT_PING_INTERVAL, default 20]",
    )
    parser.add_argument(
        "--ping-timeout",
        type=float,
        default=float(env.get("CHAT_PING_TIMEOUT", "20")),
        help="seconds without a pong before reconnecting [CHAT_PING_TIMEOUT, default 20]",
    )
    parser.add_argument(
        "--takeover",
        action=argparse.BooleanOptionalAction,
        default=_flag(env.get("CHAT_TAKEOVER", "0")),
        help=(
            "if your nick is connected elsewhere, take it over without asking (line mode "
            "otherwise exits with status 4) [CHAT_TAKEOVER, default off]"
        ),
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=float(env.get("CHAT_WAIT", "30")),
        metavar="SECONDS",
        help=(
            "line mode: how long to wait for the server to take the messages before giving "
            "up with status 3; 0: no limit, so line mode may wait for ever for a server "
            "that never comes back [CHAT_WAIT, default 30]"
        ),
    )
    parser.add_argument(
        "--seconds",
        action=argparse.BooleanOptionalAction,
        default=_flag(env.get("CHAT_SECONDS", "0")),
        help="seconds in the time stamps [CHAT_SECONDS, default off]",
    )
    parser.add_argument(
        "--title",
        action=argparse.BooleanOptionalAction,
        default=_flag(env.get("CHAT_TITLE", "0")),
        help="show the window and activity in the terminal's title [CHAT_TITLE, default off]",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path(env["CHAT_LOG_DIR"]) if env.get("CHAT_LOG_DIR") else None,
        help="keep a log file per window in this directory [CHAT_LOG_DIR, default none]",
    )
    parser.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="N",
        help="probe mode: send N numbered messages, wait for every ack, print a "
        "PROBE-REPORT line and exit (used by chat-chaos)",
    )
    parser.add_argument(
        "--probe-interval", type=float, default=0.2, help="seconds between probe messages"
    )
    args = parser.parse_args(argv)
    if not is_valid_nick(args.nick):
        parser.error(f"invalid nick {args.nick!r}: 1-24 of A-Z a-z 0-9 _ -, not starting with -")
    rooms = []
    for raw in (args.rooms or DEFAULT_ROOM).split(","):
        room = normalize_room(raw.strip())
        if room is None:
            parser.error(f"invalid room {raw!r}: 1-32 of a-z 0-9 _ -")
        rooms.append(room)
    if len(set(rooms)) > MAX_ROOMS:
        parser.error(f"{len(set(rooms))} rooms: the server allows at most {MAX_ROOMS} at once")
    return ClientConfig(
        url=args.url,
        nick=args.nick,
        rooms=tuple(dict.fromkeys(rooms)),
        state_dir=args.state_dir,
        mode=args.mode,
        demo=args.demo,
        demo_interval=args.demo_interval,
        trace=args.trace,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        probe=args.probe,
        probe_interval=args.probe_interval,
        rooms_given=args.rooms is not None,
        takeover=args.takeover,
        wait=args.wait,
        seconds=args.seconds,
        title=args.title,
        log_dir=args.log_dir,
    )
