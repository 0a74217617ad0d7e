"""The README's picture of the client, rendered from the real client's screen.

A real server, real peers and the real client in a real pseudo-terminal; pyte's screen
(characters, colours, attributes) becomes an SVG through rich's terminal exporter. Clock
times are set to 09:41 so that the picture does not change by the minute; everything
else is what the client drew. The test fails when docs/screenshot.svg is not what the
client draws today: refresh it with

    UPDATE_SCREENSHOT=1 ./scripts/test tests/test_screenshot.py
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pyte
from rich.console import Console
from rich.style import Style
from rich.text import Text

from tests.helpers import peer
from tests.procs import ServerProcess
from tests.terminal import Terminal

PICTURE = Path(__file__).parent.parent / "docs" / "screenshot.svg"
ROWS, COLS = 26, 100
CLOCK = re.compile(r"(?<!\d)\d\d:\d\d(?!\d)")

# pyte's colour names -> rich's.
_NAMES = {"brown": "yellow", "brightbrown": "bright_yellow"}


def _colour(name: str) -> str | None:
    if name == "default":
        return None
    if re.fullmatch(r"[0-9a-fA-F]{6}", name):
        return "#" + name.lower()
    name = _NAMES.get(name, name)
    return "bright_" + name[6:] if name.startswith("bright") and "_" not in name else name


def to_svg(screen: pyte.Screen, title: str) -> str:
    console = Console(
        record=True,
        width=screen.columns,
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        legacy_windows=False,
    )
    for y in range(screen.lines):
        row = screen.buffer[y]
        chars = [row[x] for x in range(screen.columns)]
        plain = "".join(c.data for c in chars)
        for match in CLOCK.finditer(plain):  # a fixed clock
            for offset, digit in enumerate("09:41"):
                x = match.start() + offset
                chars[x] = chars[x]._replace(data=digit)
        line = Text(no_wrap=True, overflow="crop", end="\n")
        for char in chars:
            style = Style(
                color=_colour(char.fg),
                bgcolor=_colour(char.bg),
                bold=char.bold or None,
                italic=char.italics or None,
                underline=char.underscore or None,
                reverse=char.reverse or None,
            )
            data = char.data or " "
            if data == " ":
                # Spaces apart from the text after them: SVG renderers (librsvg) drop
                # spaces at the start of a text element, which would shift the text.
                style += Style(meta={"space": True})
            line.append(data, style)
        console.print(line, soft_wrap=True)
    return console.export_svg(title=title)


async def test_the_readme_picture_is_what_the_client_draws(db: Path, tmp_path: Path) -> None:
    proc = ServerProcess(db).start()
    term = None
    try:
        async with (
            peer(proc.url, "bob", rooms=["lobby", "dev"]) as bob,
            peer(proc.url, "carol") as carol,
            peer(proc.url, "dave", rooms=["lobby", "dev"]) as dave,
        ):
            await bob.say("morning all")
            await carol.say("the deploy went out at nine, no alarms so far")
            action = {"type": "send", "cid": "a1", "room": "lobby", "action": True}
            await dave.send({**action, "body": "is reading the logs"})
            while (await dave.recv())["type"] != "ack":
                pass
            await bob.say("alice: could you review #42 before lunch? it touches the reconnect code")
            args = ["--url", proc.url, "--nick", "alice", "--rooms", "lobby,dev"]
            args += ["--state-dir", str(tmp_path), "--mode", "tui"]
            term = Terminal(args, rows=ROWS, cols=COLS)
            await term.wait_for(lambda s: "│ connected" in s and "4 here" in s)
            term.type("on it, give me ten minutes\r")
            await term.wait_for(lambda s: "ten minutes" in s and "sending" not in s)
            await carol.say("lunch at the usual place?", to="alice")
            await dave.say("build is green again", room="dev")
            await bob.say(
                "here is the trace:\n"
                + "\n".join(f"  frame {n}: reconnect attempt {n} after {2**n}s" for n in range(16))
            )
            await term.wait_for(lambda s: "more lines (/expand" in s and "@carol(1)" in s)
            svg = to_svg(term.screen, "chat-client --nick alice")
    finally:
        if term is not None:
            term.close()
        proc.stop()
    if os.environ.get("UPDATE_SCREENSHOT"):
        PICTURE.write_text(svg)
    assert PICTURE.exists() and PICTURE.read_text() == svg, (
        "docs/screenshot.svg is not what the client draws now: run "
        "UPDATE_SCREENSHOT=1 ./scripts/test tests/test_screenshot.py and commit it"
    )
