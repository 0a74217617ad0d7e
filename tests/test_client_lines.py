"""Line mode through real pipes against a real server process, reconnect included."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers import peer
from tests.procs import ServerProcess


def client(url: str, nick: str, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "chat_client",
        "--url",
        url,
        "--nick",
        nick,
        "--state-dir",
        str(state),
        *extra,
    ]


def test_echo_into_a_pipe_posts_and_exits(db: Path, tmp_path: Path) -> None:
    proc = ServerProcess(db).start()
    try:
        done = subprocess.run(
            client(proc.url, "bot", tmp_path),
            input="hi from a pipe\n/me waves\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "#lobby <bot> hi from a pipe" in done.stdout
        assert "#lobby * bot waves" in done.stdout
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT sender, body, action FROM messages ORDER BY id").fetchall()
        assert rows == [("bot", "hi from a pipe", 0), ("bot", "waves", 1)]
    finally:
        proc.stop()


class Lines:
    """Collect a subprocess's stdout lines as they come."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert popen.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(popen.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    async def wait_for(self, text: str, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                await asyncio.sleep(0.05)


async def test_line_mode_reconnects_and_prints_each_message_once(db: Path, tmp_path: Path) -> None:
    proc = ServerProcess(db).start()
    popen = subprocess.Popen(
        client(proc.url, "liner", tmp_path, "--ping-interval", "1", "--ping-timeout", "1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = Lines(popen)
    assert popen.stdin is not None
    try:
        await out.wait_for("connected as liner")
        async with peer(proc.url, "bob") as bob:
            secret = bob.welcome["secret"]
            await bob.say("before the crash")
            popen.stdin.write("hello from liner\n")
            popen.stdin.flush()
            await out.wait_for("<liner> hello from liner")
        proc.kill()
        await out.wait_for("reconnecting")
        popen.stdin.write("typed while down\n")
        popen.stdin.flush()
        proc.start()
        await out.wait_for("<liner> typed while down")
        async with peer(proc.url, "bob", secret=secret) as bob:
            await bob.say("after the crash")
        await out.wait_for("<bob> after the crash")
        popen.stdin.write("/quit\n")
        popen.stdin.flush()
        assert await asyncio.to_thread(popen.wait, 10) == 0
        for text in (
            "<bob> before the crash",
            "<liner> hello from liner",
            "<liner> typed while down",
            "<bob> after the crash",
        ):
            assert sum(text in line for line in out.lines) == 1, (text, out.lines)
    finally:
        popen.kill()
        proc.stop()
