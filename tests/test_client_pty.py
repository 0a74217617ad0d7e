"""The real client in a real pseudo-terminal, against a real server process."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path

from tests.helpers import peer
from tests.procs import ServerProcess
from tests.terminal import Terminal

HOSTILE = "evil \x1b]0;pwned\x07\x1b]52;c;aGVsbG8=\x07\x1b[2J\x1b[1;1H\x9b31m\r\x08end"


async def test_screen_shows_messages_keeps_typing_blocks_escapes_and_survives_restart(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    term = Terminal(
        [
            "--url",
            proc.url,
            "--nick",
            "alice",
            "--state-dir",
            str(tmp_path / "state"),
            "--mode",
            "tui",
            "--ping-interval",
            "2",
            "--ping-timeout",
            "2",
        ]
    )
    try:
        await term.wait_for(lambda s: "connected" in s)
        async with peer(proc.url, "bob") as bob:
            bob_secret = bob.welcome["secret"]
            await bob.say("first from bob")
            await term.wait_for(lambda s: "<bob> first from bob" in s)

            # Half a line typed; a message arrives; the line being typed is intact.
            term.type("half typed")
            await term.wait_for(lambda s: "[#lobby] half typed" in s)
            await bob.say("second from bob")
            screen = await term.wait_for(lambda s: "second from bob" in s)
            assert "[#lobby] half typed" in screen.splitlines()[-1]

            # A hostile message is shown as text; no sequence reaches the terminal.
            await bob.say(HOSTILE)
            screen = await term.wait_for(lambda s: "<bob> evil end" in s)
            assert b"pwned" not in term.raw
            assert b"52;c;" not in term.raw
            assert b"\x9b" not in term.raw
            assert "first from bob" in screen  # the screen was not cleared

            term.type(" done\r")
            got = await bob.expect("msg")
            assert got["body"] == "half typed done"

        # Kill the server outright; type while it is down; bring it back.
        proc.kill()
        await term.wait_for(lambda s: "reconnecting" in s)
        term.type("while down\r")
        await term.wait_for(lambda s: "while down  (sending…)" in s)
        proc.start()
        await term.wait_for(lambda s: "│ connected" in s, timeout=40)
        async with peer(proc.url, "bob", secret=bob_secret) as bob:
            await bob.say("after restart")
        screen = await term.wait_for(lambda s: "after restart" in s)
        await asyncio.sleep(0.5)
        screen = term.text()
        for line in (
            "first from bob",
            "second from bob",
            "half typed done",
            "while down",
            "after restart",
            "evil end",
        ):
            assert screen.count(line) == 1, f"{line!r} not exactly once:\n{screen}"
        assert "sending…" not in screen
    finally:
        term.close()
        proc.stop()


ESCAPES = {
    "csi clear": "\x1b[2J\x1b[H",
    "csi 8-bit": "\x9b2J",
    "osc 0 title": "\x1b]0;TITLE-PWNED\x07",
    "osc 8 link": "\x1b]8;;http://evil.invalid\x1b\\LINKTEXT\x1b]8;;\x1b\\",
    "osc 52 clipboard": "\x1b]52;c;Q0xJUEJPQVJE\x07",
    "dcs": "\x1bP+q544e\x1b\\",
    "bel": "\x07\x07",
    "cr overwrite": "\rOVERWRITE",
    "backspace": "abc\x08\x08\x08",
}


async def test_every_escape_class_and_pathological_text_stay_inert(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    term = Terminal(
        ["--url", proc.url, "--nick", "victim", "--state-dir", str(tmp_path), "--mode", "tui"]
    )
    try:
        await term.wait_for(lambda s: "connected" in s)
        async with peer(proc.url, "mallory") as mallory:
            for n, payload in enumerate(ESCAPES.values()):
                await mallory.say(f"case{n} [{payload}] end{n}")
            await mallory.say("e" + "\u0301" * 3000)  # stacked combining marks
            await mallory.say("W" * 4000)  # the longest body the server takes
            await mallory.say("still responsive")
            screen = await term.wait_for(lambda s: "still responsive" in s, timeout=20)
        raw = bytes(term.raw)
        for marker in (b"TITLE-PWNED", b"]52;", b"evil.invalid", b"\x9b", b"P+q", b"\x1b]"):
            assert marker not in raw, f"{marker!r} reached the terminal"
        assert raw.count(b"\x07") <= 1, "bells from the network reached the terminal"
        # The screen ends with the newest lines, not pushed out by the 4000-character one,
        # which is cut short after a dozen lines (/expand shows it whole).
        lines = [line for line in screen.splitlines() if line.strip()]
        assert "still responsive" in lines[-3]
        assert "more lines (/expand shows them)" in lines[-4]
        assert lines[-5].startswith(" " * 16 + "WWW")
        for _ in range(3):  # PageUp past the long line: the escape cases are up there, inert
            term.type("\x1b[5~")
            await asyncio.sleep(0.3)
        screen = await term.wait_for(lambda s: "end8" in s)
        assert "[OVERWRITE] end7" in screen
        assert "[abc] end8" in screen
        for _ in range(3):
            term.type("\x1b[6~")
        term.type("typed after all that\r")
        await term.wait_for(lambda s: "typed after all that" in s and "(sending" not in s)
    finally:
        term.close()
        proc.stop()


async def test_combining_marks_that_end_a_line_are_drawn_once(db: Path, tmp_path: Path) -> None:
    """attack-r4 F3: a body ending in a combining mark reached the terminal with the mark
    twice (``qá́``), at the end of any line: a message, a ``/me``, a wrapped line."""
    proc = ServerProcess(db).start()
    term = Terminal(
        ["--url", proc.url, "--nick", "victim", "--state-dir", str(tmp_path), "--mode", "tui"]
    )
    bodies = [
        ("e1 Z\u20dd", False),
        ("\u20dd", False),
        ("e3 Z\u20e3", False),
        ("e4 Z\u0488", False),
        ("e5 qa\u0301", False),
        ("waves\u0301", True),
        ("wrap\u0301 " + "w" * 80, False),  # the first line ends after the mark
        ("x" * 83 + "\u0301", False),  # as wide as the window
    ]
    try:
        await term.wait_for(lambda s: "connected" in s)
        async with peer(proc.url, "mallory") as mallory:
            for body, action in bodies:
                await mallory.say(body, action=action)
            await mallory.say("after the marks")
            await term.wait_for(lambda s: "after the marks" in s)
        await asyncio.sleep(0.3)
        raw = bytes(term.raw).decode()
        for mark in "\u20dd\u20e3\u0488\u0301":
            assert mark * 2 not in raw, f"{mark!r} drawn twice"
        lines = [unicodedata.normalize("NFD", line) for line in term.lines()]  # pyte composes
        for end in ("<mallory> e5 qa", "* mallory waves", "<mallory> wrap", "x" * 83):
            assert any(line.endswith(end + "\u0301") for line in lines), (end, lines)
        assert sum(line.count("\u0301") for line in lines) == 4, lines
        term.type("typed after the marks\r")
        await term.wait_for(lambda s: "<victim> typed after the marks" in s)
    finally:
        term.close()
        proc.stop()
