"""``python -m chat_client`` / ``chat-client``: wire connection, model and a UI together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from chat_client.config import ClientConfig, parse_config
from chat_client.connection import ChatConnection, Frame
from chat_client.controller import Controller
from chat_client.demo import DemoBot
from chat_client.linemode import LinePrinter
from chat_client.model import SERVER_WINDOW, ChatModel
from chat_client.probe import Probe, report_line
from chat_client.sanitize import clean
from chat_client.secrets import SecretStore

#: How long line mode waits, at the end of its input, for its messages to be acknowledged.
DRAIN_SECONDS = 10.0


def _stdin_lines(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None], stdin: TextIO, once: bool
) -> None:
    """Read stdin in a thread (works for pipes, files, /dev/null and terminals)."""
    while True:
        line = stdin.readline()
        loop.call_soon_threadsafe(queue.put_nowait, line or None)
        if not line or once:
            return


class ChatClient:
    def __init__(self, config: ClientConfig, stdin: TextIO, stdout: TextIO) -> None:
        self.config = config
        self.stdin = stdin
        self.stdout = stdout
        self.model = ChatModel(config.nick, config.rooms[0])
        self.printer = LinePrinter(stdout)
        self.connection = ChatConnection(
            config.url,
            config.nick,
            list(config.rooms),
            SecretStore(config.state_dir),
            on_frame=self._frame,
            on_status=lambda status: self.controller.status(status),
            trace=self._trace if config.trace else None,
            ping_interval=config.ping_interval or None,
            ping_timeout=config.ping_timeout or None,
        )
        self.controller = Controller(self.model, self.connection)
        self.controller.on_quit = self._quit
        self.bot = (
            DemoBot(self.connection, config.rooms[0], config.demo_interval) if config.demo else None
        )
        self.probe = Probe(self.connection, config.rooms[0]) if config.probe else None
        self.quit = asyncio.Event()
        self.ui_active = False

    def _frame(self, frame: Frame) -> None:
        self.controller.frame(frame)
        if self.bot is not None:
            self.bot.frame(frame)
        if self.probe is not None:
            self.probe.frame(frame)

    def _trace(self, direction: str, text: str) -> None:
        line = f"{direction} {clean(text)}"
        if self.ui_active:
            self.model.notice(line, SERVER_WINDOW)
        else:
            print(line, file=sys.stderr, flush=True)

    def _quit(self) -> None:
        self.quit.set()

    def interactive(self) -> bool:
        if self.config.mode == "tui":
            return True
        return self.config.mode == "auto" and self.stdin.isatty() and self.stdout.isatty()

    async def run(self) -> None:
        # In a container the client is PID 1, which gets no default SIGTERM action.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self._quit)
        connection = asyncio.create_task(self.connection.run())
        bot = asyncio.create_task(self.bot.run()) if self.bot else None
        try:
            if self.probe is not None:
                report = await self.probe.run(
                    self.config.probe, self.config.probe_interval, quiet=5.0, limit=180.0
                )
                print(report_line(report), file=self.stdout, flush=True)
            elif self.interactive() and not self.config.demo:
                await self._run_ui()
            else:
                switch = await self._run_lines()
                if switch:  # a person took over this demo client
                    if bot is not None:
                        bot.cancel()
                    self.bot = None
                    await self._run_ui()
        finally:
            if bot is not None:
                bot.cancel()
            self.connection.stop()
            await connection

    async def _run_lines(self) -> bool:
        """Line mode until quit or end of input; True to open the full-screen UI."""
        self.model.listeners.append(self.printer)
        # A demo client in a terminal (an attached replica) waits for Enter to open the UI.
        to_ui = self.config.demo and self.interactive()
        if to_ui:
            self.model.notice("press Enter to open the full-screen chat", SERVER_WINDOW)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=_stdin_lines, args=(loop, queue, self.stdin, to_ui), daemon=True
        ).start()
        quit_wait = asyncio.create_task(self.quit.wait())
        try:
            while not self.quit.is_set():
                line_wait = asyncio.create_task(queue.get())
                await asyncio.wait({line_wait, quit_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not line_wait.done():
                    line_wait.cancel()
                    break
                line = line_wait.result()
                if line is None:  # end of input
                    if self.config.demo:
                        await quit_wait  # a demo client keeps chatting
                    else:
                        await self._drain()
                    break
                if line.strip():
                    await self._until_synced()  # commands need a live session
                    self.controller.submit(line)
                if to_ui:
                    self.model.listeners.remove(self.printer)
                    return not self.quit.is_set()
        finally:
            quit_wait.cancel()
        return False

    async def _until_synced(self) -> None:
        while not self.connection.synced and not self.quit.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _drain(self) -> None:
        """Give what was typed (or piped) time to be acknowledged before leaving."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                # Polling: the outbox empties on acks from the network task, rarely.
                while self.connection.outbox or not self.connection.synced:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

    async def _run_ui(self) -> None:
        from chat_client.tui import ChatUI  # prompt_toolkit is only needed here

        ui = ChatUI(
            self.model,
            self.controller.submit,
            self.controller.completions,
            self.controller.status_text,
        )
        self.controller.on_change = ui.refresh
        self.ui_active = True
        self.quit.clear()
        watcher = asyncio.create_task(self.quit.wait())
        watcher.add_done_callback(lambda _: ui.exit())
        try:
            await ui.run()
        finally:
            watcher.cancel()
            self.ui_active = False


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    client = ChatClient(config, sys.stdin, sys.stdout)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(client.run())


if __name__ == "__main__":
    main()
