"""Never strand a message (issue 10, item 8): pacing, retries, refusals, cancelling, exit
statuses. Real server processes, the real client through pipes and a real pty.

Tests marked ``ROUND 2`` need the server side of docs/notes round-2 protocol decisions
(``cid`` and ``retry_after`` on ``rate_limited``, per-address limits, ``takeover``,
``welcome.epoch``); they fail against a server without them, by design.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

from tests.helpers import peer
from tests.procs import ServerProcess, line_client_command
from tests.stack import free_port
from tests.terminal import CTRL_C, Terminal, paste

EXIT_UNDELIVERED, EXIT_NICK, EXIT_STATE = 3, 4, 5


def stored(db: Path, sender: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT body FROM messages WHERE sender = ? ORDER BY id", (sender,)
        ).fetchall()
    return [body for (body,) in rows]


def run(
    args: list[str], stdin: str, timeout: float = 30
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


async def test_line_mode_fails_fast_with_status_4_when_the_nick_is_someone_elses(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    try:
        async with peer(proc.url, "ci-bot"):
            pass  # ci-bot is registered, and this client holds no secret for it
        done, took = await asyncio.to_thread(
            run, line_client_command(proc.url, "ci-bot", tmp_path), "deploy finished\n"
        )
        assert done.returncode == EXIT_NICK, done.stderr
        assert took < 10, f"took {took:.1f}s"
        assert "the nick ci-bot is registered to someone else" in done.stderr
        assert stored(db, "ci-bot") == []
    finally:
        proc.stop()


async def test_line_mode_gives_up_with_status_3_when_the_server_is_unreachable(
    tmp_path: Path,
) -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    done, took = await asyncio.to_thread(
        run, line_client_command(url, "lonely", tmp_path, "--wait", "2"), "anybody there?\n"
    )
    assert done.returncode == EXIT_UNDELIVERED, done.stderr
    assert took < 10, f"took {took:.1f}s"
    assert "not everything was delivered" in done.stderr
    assert "nothing answers at 127.0.0.1" in done.stderr


async def test_over_limit_and_invalid_lines_are_refused_here_and_the_rest_delivered(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    try:
        lines = b"first\n" + b"x" * 4001 + b"\n" + b"bad \xff byte\n" + b"last\n"
        done = await asyncio.to_thread(
            subprocess.run,
            line_client_command(proc.url, "bot", tmp_path),
            input=lines,
            capture_output=True,
            timeout=30,
        )
        err = done.stderr.decode()
        assert done.returncode == EXIT_UNDELIVERED, err
        out = done.stdout.decode()
        assert "not sent: the message is 4,001 characters; the server takes at most 4,000" in out
        assert "not sent: the message is not valid text" in out
        assert stored(db, "bot") == ["first", "last"]
    finally:
        proc.stop()


async def test_resends_after_an_outage_are_paced_and_none_is_lost(db: Path, tmp_path: Path) -> None:
    # A small budget: 5 frames a second, 5 at once. 40 lines queued in an outage, all
    # resent at once, would trip it (the client before this fix lost them and exited 0).
    proc = ServerProcess(db, "--rate", "5", "--burst", "5").start()
    client = subprocess.Popen(
        line_client_command(proc.url, "paced", tmp_path, "--wait", "60"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("before\n")
        client.stdin.flush()
        deadline = time.monotonic() + 15
        while stored(db, "paced") != ["before"]:
            assert time.monotonic() < deadline, "the first message never arrived"
            await asyncio.sleep(0.1)
        proc.kill()
        for n in range(40):
            client.stdin.write(f"queued {n}\n")
        client.stdin.flush()
        await asyncio.sleep(1)
        proc.start()
        client.stdin.close()
        code = await asyncio.to_thread(client.wait, 60)
        err = client.stderr.read() if client.stderr else ""
        assert code == 0, err
        assert stored(db, "paced") == ["before"] + [f"queued {n}" for n in range(40)]
    finally:
        client.kill()
        proc.stop()


async def flood(url: str, seconds: float, every: float = 0.12) -> None:
    """Another nick from the same address, spending the address's message budget."""
    async with peer(url, "flooder") as flooder:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            frame = {"type": "send", "cid": uuid.uuid4().hex, "room": "lobby", "body": "x"}
            await flooder.send(frame)
            await asyncio.sleep(every)


async def test_rate_limited_sends_are_retried_after_retry_after(db: Path, tmp_path: Path) -> None:
    """ROUND 2: per-address limits; ``rate_limited`` names the ``cid`` and ``retry_after``."""
    proc = ServerProcess(db, "--address-rate", "5", "--address-burst", "5").start()
    client = subprocess.Popen(
        line_client_command(proc.url, "patient", tmp_path, "--trace", "--wait", "60"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdin is not None and client.stderr is not None
        flooding = asyncio.create_task(flood(proc.url, 4))
        await asyncio.sleep(1)
        client.stdin.write("".join(f"line {n}\n" for n in range(10)))
        client.stdin.close()
        err = await asyncio.to_thread(client.stderr.read)
        await flooding
        assert await asyncio.to_thread(client.wait, 90) == 0, err
        assert re.search(r'"code":"rate_limited".*"retry_after"', err), "never refused"
        assert stored(db, "patient") == [f"line {n}" for n in range(10)]
    finally:
        client.kill()
        proc.stop()


async def test_full_screen_refuses_an_over_limit_line_and_cancels_a_pending_one(
    db: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(db).start()
    term = Terminal(
        ["--url", proc.url, "--nick", "alice", "--state-dir", str(tmp_path), "--mode", "tui"]
    )
    try:
        await term.wait_for(lambda s: "│ connected" in s)
        term.type(paste("y" * 4001) + "\r")
        screen = await term.wait_for(lambda s: "not sent: the message is 4,001 characters" in s)
        assert "yyyy" in screen.splitlines()[-1], "the refused line stays in the input"
        term.type("\x15")  # Ctrl-U

        proc.kill()
        await term.wait_for(lambda s: "disconnected" in s)
        term.type("keep this\r")
        term.type("drop this\r")
        await term.wait_for(lambda s: "2 unsent" in term.status())
        term.type("/cancel\r")
        await term.wait_for(lambda s: "drop this  ✗ not delivered: cancelled" in s)
        assert "1 unsent" in term.status()

        # Quitting with an undelivered line asks first.
        term.type(CTRL_C)
        await term.wait_for(lambda s: "quit? 1 message is not delivered yet (y/n)" in s)
        term.type("n")
        proc.start()
        term.type("/reconnect\r")
        await term.wait_for(lambda s: "│ connected" in s and "unsent" not in term.status())
        assert stored(db, "alice") == ["keep this"]
    finally:
        term.close()
        proc.stop()


async def test_full_screen_retries_rate_limited_lines_instead_of_leaving_them_sending(
    db: Path, tmp_path: Path
) -> None:
    """ROUND 2: per-address limits; ``rate_limited`` names the ``cid`` and ``retry_after``."""
    proc = ServerProcess(db, "--address-rate", "5", "--address-burst", "5").start()
    term = Terminal(
        ["--url", proc.url, "--nick", "alice", "--state-dir", str(tmp_path), "--mode", "tui"]
    )
    try:
        await term.wait_for(lambda s: "│ connected" in s)
        flooding = asyncio.create_task(flood(proc.url, 4))
        await asyncio.sleep(1)
        for n in range(5):
            term.type(f"line {n}\r")
        await term.wait_for(lambda s: "over the server's rate limit" in s)
        await flooding
        await term.wait_for(lambda s: "sending" not in s and "unsent" not in term.status(), 20)
        assert stored(db, "alice") == [f"line {n}" for n in range(5)]
    finally:
        term.close()
        proc.stop()


async def test_a_new_database_drops_the_resume_point(db: Path, tmp_path: Path) -> None:
    """ROUND 2: ``welcome.epoch`` changes with a new database; ids start again at 1."""
    proc = ServerProcess(db).start()
    term = Terminal(
        ["--url", proc.url, "--nick", "alice", "--state-dir", str(tmp_path), "--mode", "tui"]
    )
    try:
        await term.wait_for(lambda s: "│ connected" in s)
        async with peer(proc.url, "bob") as bob:
            for n in range(3):
                await bob.say(f"old {n}")
        await term.wait_for(lambda s: "old 2" in s)
        proc.kill()
        fresh = ServerProcess(tmp_path / "new.db", port=proc.port).start()
        try:
            term.type("/reconnect\r")
            await term.wait_for(lambda s: "history was reset" in s, timeout=20)
            async with peer(fresh.url, "bob") as bob:
                await bob.say("new 0")  # id 1 again: a client that kept its ids drops it
            await term.wait_for(lambda s: "<bob> new 0" in s)
        finally:
            fresh.stop()
    finally:
        term.close()
        proc.stop()
