"""A real pseudo-terminal running the real client, read back through a VT100 emulator.

pexpect gives the pty; pyte interprets what the client wrote, so tests assert on the
screen a person would see, and on the raw bytes that reached the terminal.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable

import pexpect
import pyte

ROWS, COLS = 24, 100

# What a terminal sends for these keys (xterm).
PGUP, PGDN = "\x1b[5~", "\x1b[6~"
ALT_HOME, ALT_END = "\x1b[1;3H", "\x1b[1;3F"
ALT_LEFT, ALT_RIGHT = "\x1b[1;3D", "\x1b[1;3C"
CTRL_C = "\x03"


def alt(key: str) -> str:
    return "\x1b" + key


def paste(text: str) -> str:
    """Bracketed paste, as a terminal sends it when the application asked for it."""
    return "\x1b[200~" + text + "\x1b[201~"


class Terminal:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        rows: int = ROWS,
        cols: int = COLS,
    ) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.lock = threading.Lock()
        command = command or [sys.executable, "-m", "chat_client", *args]
        self.child = pexpect.spawn(
            command[0],
            command[1:],
            env={**os.environ, "TERM": "xterm-256color", **(env or {})},
            dimensions=(rows, cols),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.child.read_nonblocking(65536, timeout=0.1)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return
            with self.lock:
                self.raw += data
                self.stream.feed(data)

    def lines(self) -> list[str]:
        with self.lock:
            return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def type(self, text: str) -> None:
        self.child.send(text)

    def char_at(self, text: str) -> pyte.screens.Char:
        """The screen cell where ``text`` first starts (its colours and attributes)."""
        with self.lock:
            for y, line in enumerate(self.screen.display):
                x = line.find(text)
                if x >= 0:
                    char: pyte.screens.Char = self.screen.buffer[y][x]
                    return char
        raise AssertionError(f"{text!r} is not on the screen:\n{self.text()}")

    def status(self) -> str:
        """The status bar: the line above the input line."""
        lines = self.lines()
        return next(line for line in reversed(lines[:-1]) if "│" in line)

    async def wait_for(self, check: Callable[[str], bool], timeout: float = 10.0) -> str:
        try:
            async with asyncio.timeout(timeout):
                while not check(self.text()):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError("screen never matched:\n" + self.text()) from None
        return self.text()

    def close(self) -> None:
        if self.child.isalive():
            self.child.sendcontrol("c")
            try:
                self.child.expect(pexpect.EOF, timeout=5)
            except pexpect.TIMEOUT:
                self.child.terminate(force=True)
