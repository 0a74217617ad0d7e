"""Nicks nobody can steal, from the client's side (issue 10, item 9): the client proposes
and stores its own secret, asks before taking over its own live nick, and says where it
was replaced from. Real server processes; the real client in pipes and in a real pty.

Tests marked ``ROUND 2`` need the server side of the round-2 protocol decisions
(client-proposed secrets with ``registered``, ``takeover`` / ``nick_in_use``, the
replaced-from address in the 4001 reason); they fail against a server without them.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

from tests.helpers import peer
from tests.procs import ServerProcess, line_client_command
from tests.terminal import Terminal

EXIT_NICK, EXIT_STATE = 4, 5


def traced(stderr: str, direction: str, kind: str) -> dict[str, object]:
    """The first frame of a type in ``--trace`` output (``>`` sent, ``<`` received)."""
    for line in stderr.splitlines():
        if line.startswith(f"{direction} {{") and f'"type":"{kind}"' in line:
            frame: dict[str, object] = json.loads(line[2:])
            return frame
    raise AssertionError(f"no {direction} {kind} in:\n{stderr}")


async def test_the_client_proposes_a_secret_stored_before_the_hello(
    db: Path, tmp_path: Path
) -> None:
    """ROUND 2: a proposed secret registers the nick; ``welcome.registered``."""
    proc = ServerProcess(db).start()
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            line_client_command(proc.url, "newbie", tmp_path, "--trace"),
            input="hello\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        hello, welcome = traced(done.stderr, ">", "hello"), traced(done.stderr, "<", "welcome")
        kept = next((tmp_path / "secrets").glob("epoch-*/newbie")).read_text().strip()
        assert hello["secret"] == "***", "--trace masks the secret"
        async with peer(proc.url, "newbie", secret=kept) as again:  # registered with it
            assert again.welcome["nick"] == "newbie"
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", kept), "256 random bits"
        assert welcome.get("registered") is True
        assert "secret" not in welcome
        async with peer(proc.url, "newbie", secret=kept) as again:
            assert again.welcome["nick"] == "newbie"
    finally:
        proc.stop()


async def test_a_secret_that_cannot_be_stored_claims_nothing(db: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = ServerProcess(db).start()
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            line_client_command(proc.url, "orphan", blocker / "state"),
            input="hello\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == EXIT_STATE, done.stderr
        assert "cannot keep your nick's secret in" in done.stderr
        async with peer(proc.url, "orphan") as someone:  # still free: nothing was sent
            assert someone.welcome["nick"] == "orphan"
    finally:
        proc.stop()


async def test_a_nick_change_to_someone_elses_nick_is_refused_and_the_session_goes_on(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    term = Terminal(
        ["--url", proc.url, "--nick", "alice", "--state-dir", str(tmp_path), "--mode", "tui"]
    )
    try:
        await term.wait_for(lambda s: "│ connected" in s)
        async with peer(proc.url, "bob") as bob:
            term.type("/nick bob\r")
            await term.wait_for(lambda s: "the nick bob is registered to someone else" in s)
            assert "│ alice │" in term.status()
            assert [f for f in await bob.quiet(0.5) if f["type"] != "presence"] == []
            term.type("still me\r")
            got = await bob.expect("msg")
            assert (got["from"], got["body"]) == ("alice", "still me")
    finally:
        term.close()
        proc.stop()


async def test_taking_over_your_own_live_nick_asks_and_the_replaced_client_says_from_where(
    db: Path, tmp_path: Path
) -> None:
    """ROUND 2: ``takeover: false`` / ``nick_in_use``, and the address in the 4001 reason."""
    proc = ServerProcess(db).start()
    args = ["--url", proc.url, "--nick", "alice", "--state-dir", str(tmp_path), "--mode", "tui"]
    first, second = Terminal(args), None
    try:
        await first.wait_for(lambda s: "│ connected" in s)
        first.type("/join dev\r")  # the window this person is looking at
        await first.wait_for(lambda s: "#dev: 1 here" in s)

        second = Terminal(args)
        # Asked in the window and on the input line.
        await second.wait_for(lambda s: s.count("alice is connected elsewhere: take over?") == 2)
        assert "│ connected" in first.status(), "asking must not disturb the live session"
        second.type("n")
        await second.wait_for(lambda s: "not taken over" in s)

        second.type("/reconnect\r")
        await second.wait_for(lambda s: s.count("alice is connected elsewhere: take over?") == 3)
        second.type("y")
        await second.wait_for(lambda s: "│ connected" in s)
        screen = await first.wait_for(lambda s: "this client was replaced" in s)
        assert "[#dev]" in screen.splitlines()[-1]
        assert "connected again from 127.0.0.1" in screen
        assert "offline" in first.status()
    finally:
        first.close()
        if second is not None:
            second.close()
        proc.stop()


async def test_line_mode_takes_over_a_live_nick_only_when_told_to(db: Path, tmp_path: Path) -> None:
    """ROUND 2: ``takeover: false`` on the first connection, ``nick_in_use``."""
    proc = ServerProcess(db).start()
    try:
        first = await asyncio.to_thread(
            subprocess.run,
            line_client_command(proc.url, "bot", tmp_path),
            input="register me\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert first.returncode == 0, first.stderr
        secret = next((tmp_path / "secrets").glob("epoch-*/bot")).read_text().strip()
        async with peer(proc.url, "bot", secret=secret) as live:
            refused = await asyncio.to_thread(
                subprocess.run,
                line_client_command(proc.url, "bot", tmp_path),
                input="do not kick\n",
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert refused.returncode == EXIT_NICK, refused.stderr
            assert "bot is connected elsewhere: --takeover takes it over" in refused.stderr
            assert [f for f in await live.quiet(0.5) if f["type"] == "msg"] == []
            taken = await asyncio.to_thread(
                subprocess.run,
                line_client_command(proc.url, "bot", tmp_path, "--takeover"),
                input="took over\n",
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert taken.returncode == 0, taken.stderr
            assert await live.closed() == 4001
    finally:
        proc.stop()


async def test_the_first_hello_asks_and_automatic_reconnects_take_the_nick_back(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    client = subprocess.Popen(
        line_client_command(proc.url, "steady", tmp_path, "--trace", "--ping-interval", "1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    hellos: list[dict[str, object]] = []

    def read() -> None:
        assert client.stderr is not None
        for line in client.stderr:
            if line.startswith('> {"type":"hello"'):
                hellos.append(json.loads(line[2:]))

    reader = asyncio.get_running_loop().run_in_executor(None, read)
    try:
        for count in (1, 2):
            async with asyncio.timeout(30):
                while len(hellos) < count:
                    await asyncio.sleep(0.05)
            if count == 1:
                await asyncio.sleep(1)  # connected
                proc.kill()
                proc.start()
        assert [h["takeover"] for h in hellos] == [False, True]
        assert hellos[1]["secret"] == hellos[0]["secret"]
    finally:
        client.kill()
        await reader
        proc.stop()
