"""The full-screen client as irssi and WeeChat users expect it (issue 12), read off a real
pseudo-terminal (pyte) running the real client against a real server process."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from chat_client.commands import KEYS, SPECS
from tests.helpers import Peer, peer
from tests.procs import ServerProcess
from tests.terminal import (
    ALT_END,
    ALT_HOME,
    ALT_LEFT,
    ALT_RIGHT,
    CTRL_C,
    PGDN,
    PGUP,
    ROWS,
    Terminal,
    alt,
    paste,
)

MESSAGE = re.compile(r"<bob> m(\d+)$")


@contextmanager
def server(db: Path, *args: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(db, *args).start()
    try:
        yield proc
    finally:
        proc.stop()


@asynccontextmanager
async def client(
    proc: ServerProcess, state: Path, *args: str, nick: str = "alice"
) -> AsyncIterator[Terminal]:
    term = Terminal(
        ["--url", proc.url, "--nick", nick, "--state-dir", str(state), "--mode", "tui", *args]
    )
    try:
        await term.wait_for(lambda s: "│ connected" in s)
        yield term
    finally:
        term.close()


async def said_by(p: Peer, nick: str) -> dict[str, object]:
    """The next message ``p`` receives from ``nick`` (skipping its own echoes)."""
    while True:
        frame = await p.expect("msg")
        if frame["from"] == nick:
            return frame


def shown(term: Terminal) -> list[int]:
    """Numbers of bob's messages m0, m1, … on the screen, top to bottom."""
    return [int(m.group(1)) for line in term.lines() if (m := MESSAGE.search(line))]


async def settle(term: Terminal, seconds: float = 0.4) -> str:
    await asyncio.sleep(seconds)
    return term.text()


async def test_pages_scroll_whole_screens_and_load_history_back_to_the_beginning(
    db: Path, tmp_path: Path
) -> None:
    with server(db, "--rate", "1000", "--burst", "1000") as proc:
        async with peer(proc.url, "bob") as bob:
            for n in range(130):
                await bob.say(f"m{n}")
        async with client(proc, tmp_path) as term:
            await term.wait_for(lambda s: "<bob> m129" in s)
            page = ROWS - 3  # window list, status bar and input line
            before = shown(term)
            assert before[-1] == 129

            # The first PgUp moves a whole page: the new bottom is the line above the old top.
            term.type(PGUP)
            await term.wait_for(lambda s: shown(term)[-1] == before[0] - 1)
            assert len(shown(term)) == page
            assert f"-- MORE ({page}) --" in term.status()

            # New messages while scrolled up do not move the view; MORE counts them.
            view = shown(term)
            async with peer(proc.url, "carol") as carol:
                await carol.say("while you read")

            def more() -> int:
                found = re.search(r"-- MORE \((\d+)\) --", term.status())
                return int(found.group(1)) if found else 0

            await term.wait_for(lambda s: more() >= page + 2)  # carol joined, and said
            assert shown(term) == view

            # PgUp at the top loads older history by itself, down to the first message.
            for _ in range(20):
                term.type(PGUP)
                await settle(term, 0.3)
                if "beginning of #lobby" in term.text():
                    break
            screen = term.text()
            assert "beginning of #lobby" in screen
            assert shown(term)[0] == 0

            # Paging down from there shows every message once, in order.
            seen: list[int] = []
            for _ in range(20):
                seen += [n for n in shown(term) if not seen or n > seen[-1]]
                if "-- MORE" not in term.status():
                    break
                term.type(PGDN)
                await settle(term, 0.2)
            assert seen == list(range(130))

            # Alt-Home: the top; Alt-End: the bottom, and MORE is gone.
            term.type(ALT_HOME)
            await term.wait_for(lambda s: "beginning of #lobby" in s)
            term.type(ALT_END)
            await term.wait_for(lambda s: "while you read" in s and "MORE" not in term.status())

            # /history says what it loaded.
            term.type("/clear\r")
            await term.wait_for(lambda s: "<bob>" not in s)
            term.type("/history 5\r")
            screen = await term.wait_for(lambda s: "loaded 5 older messages (from " in s)
            assert "; /history loads more" in screen
            assert shown(term) == [126, 127, 128, 129]  # and carol's, the newest
            assert "<carol> while you read" in screen


async def test_numbered_windows_activity_alt_keys_and_close(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term:
            term.type("/join dev\r")
            await term.wait_for(lambda s: "#dev: 1 here" in s)
            term.type("/j ops\r")  # irssi's alias
            await term.wait_for(lambda s: "#ops: 1 here" in s)
            bob_context = peer(proc.url, "bob", rooms=["lobby", "dev"])
            bob = await bob_context.__aenter__()
            await bob.say("ordinary chatter")
            await bob.say("alice: can you look?", room="dev")
            await bob.say("psst", to="alice")
            top = await term.wait_for(lambda s: "5:@bob(1)" in s.splitlines()[0])
            assert top.splitlines()[0].split() == [
                "1:server",
                "2:#lobby(1)",
                "3:#dev(1)",
                "4:#ops",
                "5:@bob(1)",
            ]
            # Coloured by what happened: a mention, a DM and ordinary messages differ.
            mention, dm, chatter = (term.char_at(w) for w in ("3:#dev", "5:@bob", "2:#lobby"))
            assert mention.bg == "magenta"
            assert dm.bg == "green"
            assert chatter.bg not in ("magenta", "green") and chatter.bold
            assert "Act: 2,3,5" in term.status()

            # Alt-A: the mention first, then the DM, then ordinary activity.
            for expected in ("[#dev]", "[@bob]", "[#lobby]"):
                term.type(alt("a"))
                await term.wait_for(lambda s, e=expected: s.splitlines()[-1].startswith(e))
            assert "Act:" not in term.status()

            # Alt-1 is the server window; Alt-number and Alt-arrows move around.
            term.type(alt("1"))
            await term.wait_for(lambda s: s.splitlines()[-1].startswith("[server]"))
            term.type(alt("4"))
            await term.wait_for(lambda s: s.splitlines()[-1].startswith("[#ops]"))
            term.type(ALT_RIGHT)
            await term.wait_for(lambda s: s.splitlines()[-1].startswith("[@bob]"))
            term.type(ALT_LEFT + ALT_LEFT)
            await term.wait_for(lambda s: s.splitlines()[-1].startswith("[#dev]"))

            # /close: a conversation closes, a room is left, the server window stays.
            term.type(alt("5") + "/close\r")
            await term.wait_for(lambda s: "@bob" not in s.splitlines()[0])
            term.type(alt("4") + "/wc\r")
            await term.wait_for(lambda s: "#ops" not in s.splitlines()[0])
            term.type(alt("1") + "/close\r")
            await term.wait_for(lambda s: "the server window stays open" in s)
            await bob.send({"type": "who", "room": "ops"})
            while (frame := await bob.recv())["type"] != "members":
                pass
            assert frame["nicks"] == []
            await bob_context.__aexit__(None, None, None)


async def test_help_is_a_window_listing_every_command_alias_and_key(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term:
            term.type("/help\r")
            screen = await term.wait_for(lambda s: "Commands" in s and ":help" in s)
            text = screen
            for _ in range(6):
                term.type(PGDN)
                text += await settle(term, 0.3)
            text = " ".join(text.split())  # a long help line may wrap
            for spec in SPECS:
                assert spec.usage in text, spec.usage
                if spec.aliases:
                    assert f"({', '.join(spec.aliases)})" in text, spec.aliases
            for key, _ in KEYS:
                assert key in text, key
            assert "Ctrl-P is Docker's" in text
            term.type("/close\r")
            await term.wait_for(lambda s: "help" not in s.splitlines()[0])


def line_client(proc: ServerProcess, nick: str, state: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "chat_client", "--url", proc.url, "--nick", nick]
    command += ["--state-dir", str(state / nick), "--mode", "line"]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


async def test_link_state_in_every_window_reconnect_now_and_one_netjoin_line(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        peers: list[subprocess.Popen[str]] = []
        async with client(proc, tmp_path, "--ping-interval", "1", "--ping-timeout", "1") as term:
            term.type("/join dev\r")
            await term.wait_for(lambda s: "#dev: 1 here" in s)
            term.type(alt("2"))
            try:
                peers = [line_client(proc, f"peer{n}", tmp_path) for n in range(4)]
                screen = await term.wait_for(lambda s: "(5 here)" in s, timeout=20)
                assert screen.count("joined") == 1, "four joins at once make one line"
                assert "netjoin: 4 joined: " in screen

                proc.kill()
                await term.wait_for(lambda s: "disconnected: the connection was lost" in s)
                for key in ("1", "3"):  # ... said in every window, not only the server's
                    term.type(alt(key))
                    await term.wait_for(lambda s: "disconnected: the connection was lost" in s)
                term.type(alt("1"))
                await term.wait_for(lambda s: "still offline: nothing answers at 127.0.0.1" in s)
                assert "Errno" not in term.text()

                proc.start()
                term.type("/reconnect\r")
                await term.wait_for(lambda s: "│ connected" in s, timeout=5)
                term.type(alt("2"))
                screen = await term.wait_for(lambda s: "(5 here)" in s, timeout=40)
                after = screen[screen.index("reconnected (offline for") :]
                assert after.count("joined") <= 1, after
            finally:
                for p in peers:
                    p.kill()


async def test_long_messages_collapse_words_wrap_and_pastes_keep_their_lines(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term, peer(proc.url, "bob") as bob:
            await bob.say("\n".join(f"row {n}" for n in range(200)))
            screen = await term.wait_for(lambda s: "… 189 more lines (/expand shows them)" in s)
            assert "row 10" in screen and "row 11" not in screen
            term.type("/expand\r")
            await term.wait_for(lambda s: "row 199" in s and "more lines" not in s)

            words = [f"word{n:02}" for n in range(60)]
            await bob.say(" ".join(words))
            screen = await term.wait_for(lambda s: "word59" in s)
            tail = screen[screen.index("word00") - 6 : screen.index("word59") + 6]
            assert re.findall(r"\S+", tail.replace("<bob>", "")) == words, "a word was cut"

            # A multi-line paste shows as such, with its line count, and is one message.
            term.type(paste("first line\n    indented second\nthird\n"))
            await term.wait_for(lambda s: "[#lobby 3 lines]" in s)
            term.type("\r")
            got = await said_by(bob, "alice")
            assert got["body"] == "first line\n    indented second\nthird"
            await term.wait_for(lambda s: "    indented second" in s and "sending" not in s)

            # Alt-Enter: a new line in the same message.
            term.type("one" + "\x1b\r" + "two\r")
            got = await said_by(bob, "alice")
            assert got["body"] == "one\ntwo"


def bells(raw: bytes) -> int:
    """BEL characters that are not the end of a title sequence (OSC 2 … BEL)."""
    return raw.count(b"\x07") - raw.count(b"\x1b]2;")


async def test_bells_coalesce_ignore_highlight_words_and_activity_in_the_title(
    db: Path, tmp_path: Path
) -> None:
    with server(db, "--rate", "1000", "--burst", "1000") as proc:
        async with client(proc, tmp_path, "--title") as term, peer(proc.url, "bob") as bob:
            assert b"\x1b]2;compose-chat: alice #lobby\x07" in term.raw
            term.type("/join dev\r")
            await term.wait_for(lambda s: "#dev: 1 here" in s)
            before = bells(bytes(term.raw))
            for n in range(20):
                await bob.say(f"dm {n}", to="alice")
            await term.wait_for(lambda s: "@bob(20)" in s)
            await asyncio.sleep(0.5)
            assert bells(bytes(term.raw)) - before == 1, "20 DMs ring one bell"
            await term.wait_for(lambda s: re.search(rb"\[Act: [\d,]*4\]\x07", term.raw))

            # Highlight words are mentions: styled, and the window is coloured for them.
            term.type(alt("2") + "/highlight deploy\r")
            await term.wait_for(lambda s: "highlights: your nick, deploy" in s)
            await bob.say("the deploy is done")
            await term.wait_for(lambda s: "the deploy is done" in s)
            assert term.char_at("the deploy is done").fg == "brightmagenta"
            assert term.char_at("the deploy is done").bold

            # /ignore hides a nick, in rooms and in DMs; /unignore brings it back.
            term.type("/ignore bob\r")
            await term.wait_for(lambda s: "ignoring bob" in s)
            await bob.say("you cannot see me")
            await bob.say("nor this", to="alice")
            await bob.say("marker")
            term.type("/unignore bob\r")
            await term.wait_for(lambda s: "no longer ignoring bob" in s)
            await bob.say("visible again")
            screen = await term.wait_for(lambda s: "visible again" in s)
            assert "you cannot see me" not in screen and "marker" not in screen
            term.type(alt("4"))
            screen = await term.wait_for(lambda s: "[@bob]" in s)
            assert "nor this" not in screen


async def test_everyday_basics(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        async with peer(proc.url, "bob") as bob:
            await bob.say("yesterday's news")
            secret = bob.welcome["secret"]
        proc.stop()
        with sqlite_db(db) as conn:  # that message was sent a day ago
            conn.execute("UPDATE messages SET ts = ts - 86400000")
        proc.start()
        logs = tmp_path / "logs"
        async with client(proc, tmp_path, "--seconds", "--log-dir", str(logs)) as term:
            screen = await term.wait_for(lambda s: "yesterday's news" in s)
            # A day-change line before yesterday's message; seconds in the stamps.
            day = [line for line in screen.splitlines() if "─" in line and "20" in line]
            assert day, screen
            assert re.search(r"^\d\d:\d\d:\d\d <bob> yesterday's news", screen, re.M)

            async with peer(proc.url, "bob", secret=secret) as bob:
                # Names on /join, your own nick styled apart from the others.
                await bob.send({"type": "join", "room": "dev"})
                term.type("/j dev\r")
                await term.wait_for(lambda s: re.search("#dev: 2 here: (alice, bob|bob, alice)", s))
                term.type("hello from alice\r")
                await term.wait_for(
                    lambda s: "<alice> hello from alice" in s and "sending" not in s
                )
                await bob.say("hello from bob", room="dev")
                await term.wait_for(lambda s: "<bob> hello from bob" in s)
                mine, theirs = term.char_at("alice> hello"), term.char_at("bob> hello")
                assert mine.bold and mine.underscore
                assert not theirs.underscore

                # /query opens a conversation; /names, /whois, /clear, /away.
                term.type("/query bob are you there?\r")
                got = await said_by(bob, "alice")
                assert got["to"] == "bob" and got["body"] == "are you there?"
                await term.wait_for(lambda s: "[@bob]" in s)
                term.type(alt("3") + "/names\r")
                await term.wait_for(lambda s: s.count("#dev: 2 here") == 2)
                term.type("/whois bob\r")
                await term.wait_for(lambda s: re.search("bob is online, in .*#dev", s))
                term.type("/clear\r")
                await term.wait_for(lambda s: "hello from" not in s)
                term.type("/away lunch\r")
                await term.wait_for(lambda s: "alice (away)" in term.status())
                raw = len(term.raw)
                await bob.say("ping while away", to="alice")
                await asyncio.sleep(0.5)
                assert b"\x07" not in term.raw[raw:], "no bell while away"
                term.type("/away\r")
                screen = await term.wait_for(lambda s: "welcome back: 1 mention(s) and DM(s)" in s)
                assert "<bob> ping while away" in screen

            # Ctrl-C with a typed line asks first; n keeps the line.
            term.type("half a thought")
            term.type(CTRL_C)
            await term.wait_for(lambda s: "quit? the line you are typing would be lost" in s)
            term.type("n")
            await term.wait_for(lambda s: s.splitlines()[-1].endswith("half a thought"))
            assert term.child.isalive()
            term.type("\x15")  # Ctrl-U: nothing typed, so leaving asks nothing
        log = (logs / "#dev.log").read_text()
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d #dev <bob> hello from bob$", log, re.M)

        # The rooms you were in are remembered for the next start (without --rooms).
        async with client(proc, tmp_path) as term:
            await term.wait_for(lambda s: "2:#lobby" in s and "3:#dev" in s)


@contextmanager
def sqlite_db(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()
