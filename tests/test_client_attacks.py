"""Regressions for the outside attack on the client's promises (F1-F11), read off a real
pseudo-terminal (pyte) running the real client against a real server process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from chat_client.settings import Settings
from chat_protocol.limits import EPOCH_HEADER
from tests.helpers import peer
from tests.procs import line_client_command
from tests.terminal import Terminal, paste
from tests.test_client_screen import client, server


async def test_rooms_past_the_limit_never_open_a_window_nor_block_the_reconnect(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        # Remembered from an older run: 34 rooms, two more than the server takes.
        rooms = ["lobby", *(f"r{n}" for n in range(1, 34))]
        settings = {"servers": {proc.url: {"rooms": rooms}}}
        (tmp_path / "settings.json").write_text(json.dumps(settings))
        async with client(proc, tmp_path) as term:
            screen = await term.wait_for(lambda s: "not in #r33: the server refused" in s)
            assert "not in #r32: the server refused" in screen
            assert "#r32" not in term.status() and "#r33" not in term.status()

            term.type("/join extra\r")
            await term.wait_for(lambda s: "not joined #extra: you are in 32 rooms" in s)
            assert "extra" not in term.status()

            proc.kill()
            await term.wait_for(lambda s: "disconnected:" in s)
            term.type("\x15/join offline1\r")  # offline too: the next hello would be refused
            await term.wait_for(lambda s: "not joined #offline1: you are in 32 rooms" in s)
            term.type("\x15/leave r31\r")
            term.type("/join offline2\r")
            await term.wait_for(lambda s: "#offline2" in term.status())
            term.type("stranded no more\r")
            await term.wait_for(lambda s: "(sending…)" in s and "stranded no more" in s)

            proc.start()
            term.type("/reconnect\r")
            await term.wait_for(lambda s: "│ connected" in s, timeout=15)
            await term.wait_for(lambda s: "stranded no more" in s and "(sending" not in s)


def test_trace_never_prints_a_nick_secret(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        command = [sys.executable, "-m", "chat_client", "--url", proc.url, "--nick", "alice"]
        command += ["--state-dir", str(tmp_path), "--mode", "line", "--trace"]
        line = 'hi with "secret":"x" in it\n'
        done = subprocess.run(command, input=line, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        (secret_file,) = (tmp_path / "secrets").glob("*/alice")
        secret = secret_file.read_text().strip()
        assert '> {"type":"hello"' in done.stderr, "the trace shows the frames"
        assert secret not in done.stderr + done.stdout
        assert '"secret":"***"' in done.stderr
        assert 'secret\\":\\"x\\"' in done.stderr, "a body is shown as it is"


async def test_emoji_sequences_wrap_and_collapse_where_the_terminal_draws_them(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term, peer(proc.url, "bob") as bob:
            # Skin tones: the tail of a long line is wrapped, not cut off.
            await bob.say("skin:" + "\U0001f44d\U0001f3fd" * 40 + " |END1")
            screen = await term.wait_for(lambda s: "|END1" in s)
            assert screen.count("\U0001f44d") == 40, "every thumb is on the screen"
            # ZWJ sequences, long enough to collapse: the "… more" line is there.
            await bob.say("zwj:" + "\U0001f469\u200d\U0001f4bb" * 400 + " |END2")
            await term.wait_for(lambda s: "more lines (/expand shows them)" in s)
            term.type("/expand\r")
            await term.wait_for(lambda s: "|END2" in s)
            term.type("/clear\r")
            await bob.say(
                "flags: \U0001f1ef\U0001f1f5\U0001f1eb\U0001f1f7 and a family "
                "\U0001f468\u200d\U0001f469\u200d\U0001f467 |END3"
            )
            screen = await term.wait_for(lambda s: "|END3" in s)
            assert "flags: [JP][FR] and a family" in screen
            # Every row the client drew fits the terminal's width: nothing ran past the edge.
            for line in term.lines():
                assert "\U0001f3fd" not in line and "\u200d" not in line

            # F10: LRM/RLM/ALM and the Unicode line separators never reach the terminal raw.
            await bob.say("a\u200eb\u200fc\u061cd\u2028e\u2029f|END4")
            await term.wait_for(lambda s: "|END4" in s)
            raw = bytes(term.raw).decode("utf-8", "replace")
            for char in "\u200e\u200f\u061c\u2028\u2029":
                assert char not in raw, f"U+{ord(char):04X} reached the terminal"


def line_client(
    url: str, state: Path, nick: str = "alice", *args: str
) -> subprocess.CompletedProcess[str]:
    command = line_client_command(url, nick, state, *args)
    return subprocess.run(command, input="hi\n", capture_output=True, text=True, timeout=30)


def test_one_persons_secret_works_through_every_url_of_one_server(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        # The host's client and `docker compose run chat` reach one server by two URLs.
        first = line_client(proc.url, tmp_path)
        assert first.returncode == 0, first.stderr
        other = proc.url.rstrip("/") + "/another/url"
        asked = line_client(other, tmp_path)  # a new URL: only with the person's yes
        assert asked.returncode == 4, asked.stderr
        assert "--trust-url" in asked.stderr
        again = line_client(other, tmp_path, "alice", "--trust-url")
        assert again.returncode == 0, again.stderr
        remembered = line_client(other, tmp_path)
        assert remembered.returncode == 0, remembered.stderr
        assert len(list((tmp_path / "secrets").glob("*/alice"))) == 1, "one secret, one file"

        # A secret filed by URL (older clients did that) is still found, and refiled.
        (secret_file,) = (tmp_path / "secrets").glob("*/alice")
        old = tmp_path / "secrets" / quote(other, safe="") / "bob"
        old.parent.mkdir()
        bob = line_client(proc.url, tmp_path / "bob-first", nick="bob")
        assert bob.returncode == 0, bob.stderr
        (bobs,) = (tmp_path / "bob-first" / "secrets").glob("*/bob")
        old.write_text(bobs.read_text())
        moved = line_client(other, tmp_path, nick="bob")
        assert moved.returncode == 0, moved.stderr
        assert (secret_file.parent / "bob").read_text() == bobs.read_text()


async def test_nick_while_offline_is_said_and_keeps_the_nick_of_typed_lines(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term:
            proc.kill()
            await term.wait_for(lambda s: "disconnected:" in s)
            term.type("typed while offline\r")
            await term.wait_for(lambda s: "(sending…)" in s)
            term.type("/nick alice2\r")
            await term.wait_for(
                lambda s: (
                    "once reconnected (after your unsent line, which is sent as alice,"
                    in " ".join(s.split())
                )
            )
            proc.start()
            term.type("/reconnect\r")
            await term.wait_for(lambda s: "you are now alice2" in s, timeout=15)
            assert "alice2 │" in term.status()
        async with peer(proc.url, "bob") as bob:
            said = [
                (m["from"], m["body"])
                for f in bob.catchup
                if f["type"] == "history"
                for m in f["messages"]
            ]
            assert ("alice", "typed while offline") in said, said


async def test_a_refused_line_is_said_below_the_unsent_ones(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term:
            proc.kill()
            await term.wait_for(lambda s: "disconnected:" in s)
            for n in range(30):
                term.type(f"queued {n}\r")
            await term.wait_for(lambda s: "30 unsent" in s)
            term.type(paste("x" * 4001) + "\r")
            await term.wait_for(lambda s: "not sent: the message is 4,001 characters" in s)
            proc.start()


def test_two_clients_sharing_a_state_directory_keep_each_others_settings(
    tmp_path: Path,
) -> None:
    a, b = Settings(tmp_path), Settings(tmp_path)  # both started before either saved
    a.set_words("highlight", ["apple"])
    b.set_rooms("ws://server", ["lobby", "other2"])
    a.set_rooms("ws://elsewhere", ["dev"])
    again = Settings(tmp_path)
    assert again.words("highlight") == ["apple"]
    assert again.rooms("ws://server") == ["lobby", "other2"]
    assert again.rooms("ws://elsewhere") == ["dev"]


def test_line_mode_says_why_and_fails_a_refused_join(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        assert line_client(proc.url, tmp_path / "a").returncode == 0
        taken = line_client(proc.url, tmp_path / "b")  # alice is someone else's here
        assert taken.returncode == 4, taken.stderr
        assert "registered to someone else" in taken.stderr
        assert "not acknowledged within" not in taken.stderr

        rooms = ",".join(["lobby", *(f"r{n}" for n in range(1, 32))])
        command = [sys.executable, "-m", "chat_client", "--url", proc.url, "--nick", "carol"]
        command += ["--state-dir", str(tmp_path / "c"), "--mode", "line", "--rooms", rooms]
        joined = subprocess.run(
            command, input="/join extra\n", capture_output=True, text=True, timeout=30
        )
        assert joined.returncode == 3, joined.stderr
        assert "not joined #extra" in joined.stderr
        named = line_client_command(proc.url, "erin", tmp_path / "e")
        bad = subprocess.run(
            named, input="/join -bad\n", capture_output=True, text=True, timeout=30
        )
        assert bad.returncode == 3, bad.stderr  # refused before sending: refused all the same
        assert "-bad is not a room name" in bad.stderr


def test_a_rate_limited_join_is_asked_again_and_line_mode_waits_for_it(
    db: Path, tmp_path: Path
) -> None:
    """A ``join`` refused as ``rate_limited`` is asked again after ``retry_after`` (the
    window is not left open on a room the server never put us in); a line typed for the
    room meanwhile waits for the join (sent at once, the server refuses it: found by an
    outside tester), and line mode does not exit while a ``/join`` is unanswered."""
    with server(db, "--catchup-rate", "0.25", "--catchup-burst", "2") as proc:
        command = line_client_command(proc.url, "carol", tmp_path)
        joined = subprocess.run(
            command,
            input="/join extra\nposted to extra\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert joined.returncode == 0, joined.stderr
    assert "slow down" in joined.stdout
    assert "not delivered" not in joined.stdout
    lines = joined.stdout.splitlines()
    at = [n for n, line in enumerate(lines) if "#extra -- #extra: 1 here: carol" in line]
    said = [n for n, line in enumerate(lines) if "#extra <carol> posted to extra" in line]
    assert at and said and at[0] < said[0], joined.stdout


def test_line_mode_prints_the_answers_to_its_commands_before_it_exits(
    db: Path, tmp_path: Path
) -> None:
    """Input that ends right after ``/who``, ``/rooms`` and ``/whois`` still gets their
    answers printed: line mode waits for every command's answer, not only for acks
    (found by an outside tester: it printed none of them)."""
    with server(db) as proc:
        command = line_client_command(proc.url, "dave", tmp_path)
        done = subprocess.run(
            command,
            input="/who lobby\n/rooms\n/whois nobody\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert "rooms: #lobby (1)" in done.stdout, done.stdout
    assert "nobody is not online" in done.stdout, done.stdout


async def test_closing_a_window_never_throws_unsent_lines_away(db: Path, tmp_path: Path) -> None:
    with server(db) as proc:
        async with client(proc, tmp_path) as term:
            term.type("/join dev\r")
            await term.wait_for(lambda s: "#dev: 1 here" in s)
            proc.kill()
            await term.wait_for(lambda s: "disconnected:" in s)
            term.type("keep me\r")
            await term.wait_for(lambda s: "(sending…)" in s)
            term.type("/close\r")
            await term.wait_for(lambda s: "#dev has 1 unsent line: wait until it is" in s)
            assert "#dev" in term.status()
            term.type("\x15/cancel\r")
            await term.wait_for(lambda s: "cancelled" in s)
            term.type("/close\r")
            await term.wait_for(lambda s: "#dev" not in term.status())
            proc.start()


@asynccontextmanager
async def look_alike(real_url: str) -> AsyncIterator[tuple[str, list[str], list[str]]]:
    """Somebody else's server at another URL, announcing the real server's epoch (public:
    any handshake shows it), recording every frame it receives; it refuses each hello as
    the real server would refuse a nick that is not ours, so the client stops."""
    async with connect(real_url) as probe:
        assert probe.response is not None
        epoch = probe.response.headers[EPOCH_HEADER]
    received: list[str] = []  # every frame
    clients: list[str] = []  # every connection, by the path it asked for

    def announce(_: ServerConnection, request: Request, response: Response) -> Response:
        response.headers[EPOCH_HEADER] = epoch
        return response

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        clients.append(ws.request.path)
        async for data in ws:
            received.append(str(data))
            error = {"type": "error", "code": "nick_taken", "message": "taken", "ref": "hello"}
            await ws.send(json.dumps(error))

    async with serve(handler, "127.0.0.1", 0, process_response=announce) as fake:
        port = next(iter(fake.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", received, clients


async def test_a_server_announcing_anothers_epoch_never_gets_the_secret(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        first = line_client(proc.url, tmp_path)
        assert first.returncode == 0, first.stderr
        (secret_file,) = (tmp_path / "secrets").glob("epoch-*/alice")
        secret = secret_file.read_text().strip()

        async with look_alike(proc.url) as (fake_url, received, clients):
            stolen = await asyncio.to_thread(line_client, fake_url, tmp_path)
            assert clients, "the client did reach the look-alike"
            assert not any(secret in frame for frame in received), "the secret went to it"
            assert stolen.returncode == 4, stolen.stderr
            assert "--trust-url" in stolen.stderr, "line mode names the way to trust a URL"
            assert fake_url in stolen.stderr and proc.url in stolen.stderr

            # Trusting another URL of the real server does not trust this one.
            other = proc.url + "/via/another/name"
            trusted = await asyncio.to_thread(line_client, other, tmp_path, "alice", "--trust-url")
            assert trusted.returncode == 0, trusted.stderr
            again = await asyncio.to_thread(line_client, fake_url, tmp_path)
            assert again.returncode == 4, again.stderr
            assert not any(secret in frame for frame in received), "the secret went to it"
        assert secret_file.read_text().strip() == secret, "the secret is kept as it was"


async def test_the_full_screen_ui_asks_before_sending_a_secret_to_a_new_url(
    db: Path, tmp_path: Path
) -> None:
    with server(db) as proc:
        first = line_client(proc.url, tmp_path)
        assert first.returncode == 0, first.stderr
        other = proc.url + "/another/url"
        args = ["--url", other, "--nick", "alice", "--state-dir", str(tmp_path), "--mode", "tui"]
        term = Terminal(args)
        try:
            await term.wait_for(lambda s: "for alice? (y/n)" in s)
            assert f"only been used with {proc.url}" in term.text().replace("\n", "")
            term.type("n")
            await term.wait_for(lambda s: "alice's secret was not sent" in s)
            assert "offline" in term.status()
            term.type("/reconnect\r")
            await term.wait_for(lambda s: s.count("for alice? (y/n)") >= 2)
            term.type("y")
            await term.wait_for(lambda s: "│ connected" in s)
        finally:
            term.close()
        term = Terminal(args)  # remembered: connects without a question
        try:
            await term.wait_for(lambda s: "│ connected" in s)
            assert "(y/n)" not in term.text()
        finally:
            term.close()
