"""Regressions for the outside attack on the client's promises (F1-F11), read off a real
pseudo-terminal (pyte) running the real client against a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
