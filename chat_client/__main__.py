"""``python -m chat_client`` / ``chat-client``: wire connection, model and a UI together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from chat_client.config import (
    EXIT_NICK,
    EXIT_STATE,
    EXIT_UNDELIVERED,
    ClientConfig,
    parse_config,
)
from chat_client.connection import ChatConnection, Frame, Status
from chat_client.controller import Controller
from chat_client.demo import DemoBot
from chat_client.linemode import LinePrinter, WindowLogs
from chat_client.model import SERVER_WINDOW, ChatModel
from chat_client.probe import Probe, report_line
from chat_client.sanitize import clean
from chat_client.secrets import SecretStore
from chat_client.settings import Settings

#: What an attached replica says when someone attaches (and every so often).
ATTACH_HINT = "press Enter to chat here in the full-screen UI (detach: Ctrl-P Ctrl-Q)"


def _stdin_lines(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None], stdin: TextIO, once: bool
) -> None:
    """Read stdin in a thread (works for pipes, files, /dev/null and terminals)."""
    while True:
        try:
            line = stdin.readline()
        except (OSError, ValueError):
            line = ""
        loop.call_soon_threadsafe(queue.put_nowait, line or None)
        if not line or once:
            return


class ChatClient:
    def __init__(self, config: ClientConfig, stdin: TextIO, stdout: TextIO) -> None:
        self.config = config
        self.stdin = stdin
        self.stdout = stdout
        self.settings = Settings(config.state_dir)
        rooms = list(config.rooms)
        if not config.rooms_given and self._full_screen_only():
            rooms = self.settings.rooms(config.url) or rooms
        self.model = ChatModel(config.nick, rooms[0])
        self.printer = LinePrinter(stdout)
        self.connection = ChatConnection(
            config.url,
            config.nick,
            rooms,
            SecretStore(config.state_dir),
            on_frame=self._frame,
            on_status=self._status,
            trace=self._trace if config.trace else None,
            ping_interval=config.ping_interval or None,
            ping_timeout=config.ping_timeout or None,
            takeover=config.takeover or config.demo,
            trust_url=config.trust_url,
        )
        self.controller = Controller(
            self.model, self.connection, self.settings, interactive=self._full_screen_only()
        )
        self.controller.on_quit = self._user_quit
        self.logs = WindowLogs(config.log_dir) if config.log_dir else None
        if self.logs is not None:
            self.model.listeners.append(self.logs)
        self.bot = DemoBot(self.connection, rooms[0], config.demo_interval) if config.demo else None
        self.probe = Probe(self.connection, rooms[0]) if config.probe else None
        self.quit = asyncio.Event()
        self.exit_code = 0
        self.ui_active = False
        self._ui_exit: asyncio.Event | None = None
        self._hint: asyncio.TimerHandle | None = None

    def _full_screen_only(self) -> bool:
        return self.interactive() and not self.config.demo and not self.config.probe

    def _frame(self, frame: Frame) -> None:
        self.controller.frame(frame)
        if self.bot is not None:
            self.bot.frame(frame)
        if self.probe is not None:
            self.probe.frame(frame)

    def _status(self, status: Status) -> None:
        self.controller.status(status)
        refusal = status.refusal
        if refusal is None or refusal.during_session or self.ui_active or self.config.demo:
            return
        if self.interactive() and not self.config.probe:
            return  # the full-screen UI is about to open: it asks
        # Line mode cannot ask: say why and stop, instead of retrying forever.
        hint = {
            "nick_taken": f"the nick {refusal.nick} is registered to someone else "
            f"(no secret for it in {self.config.state_dir}): choose another with --nick",
            "nick_in_use": f"{refusal.nick} is connected elsewhere: --takeover takes it over",
            "secret_store": refusal.message,
            "new_url": f"{refusal.message}: if it is, run again with --trust-url (once: the "
            "URL is then remembered for this nick)",
            "replaced": f"replaced by another client of {refusal.nick}: {refusal.message}",
        }.get(refusal.code, refusal.message)
        print(f"chat-client: {clean(hint)}", file=sys.stderr, flush=True)
        self.exit_code = EXIT_STATE if refusal.code == "secret_store" else EXIT_NICK
        if refusal.code == "replaced":
            self.exit_code = EXIT_UNDELIVERED if self.connection.outbox else 0
        self.quit.set()

    def _trace(self, direction: str, text: str) -> None:
        line = f"{direction} {clean(text)}"
        if self.ui_active:
            self.model.notice(line, SERVER_WINDOW)
        else:
            print(line, file=sys.stderr, flush=True)

    def _user_quit(self) -> None:
        """/quit, Ctrl-C: an attached demo replica goes back to its demo; others stop."""
        if self.ui_active and self.config.demo and self._ui_exit is not None:
            self._ui_exit.set()
        else:
            self.quit.set()

    def interactive(self) -> bool:
        if self.config.mode == "tui":
            return True
        return self.config.mode == "auto" and self.stdin.isatty() and self.stdout.isatty()

    async def run(self) -> int:
        # In a container the client is PID 1, which gets no default SIGTERM action.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self.quit.set)
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
                back = False
                while await self._run_lines(back) and not self.quit.is_set():
                    # A person opened the UI of this demo client; /quit comes back here.
                    if self.bot is not None:
                        self.bot.paused = True
                    await self._run_ui()
                    if self.bot is not None:
                        self.bot.paused = False
                    back = True
        finally:
            if bot is not None:
                bot.cancel()
            self.connection.stop()
            await connection
        return self.exit_code

    async def _run_lines(self, back: bool = False) -> bool:
        """Line mode until quit or end of input; True to open the full-screen UI.

        ``back``: the person who used the full-screen UI of this demo client quit it.
        """
        self.model.listeners.append(self.printer)
        # A demo client in a terminal (an attached replica) waits for Enter to open the UI.
        to_ui = self.config.demo and self.interactive()
        loop = asyncio.get_running_loop()
        if to_ui:
            if back:
                self.model.notice(
                    "back in demo mode: this replica goes on chatting by itself (to stop "
                    "it: docker compose stop, or scale down)",
                    SERVER_WINDOW,
                )
            self.model.notice(ATTACH_HINT, SERVER_WINDOW)
            # `docker attach` resizes the terminal: say again what to do, to whoever came.
            loop.add_signal_handler(signal.SIGWINCH, self._hint_soon)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
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
                if to_ui:
                    return not self.quit.is_set()
                if line.strip():
                    if not await self._until_synced():
                        self._give_up(unsent_line=True)
                        break
                    self.controller.submit(line)
        finally:
            quit_wait.cancel()
            if to_ui:
                loop.remove_signal_handler(signal.SIGWINCH)
                if self._hint is not None:
                    self._hint.cancel()
            self.model.listeners.remove(self.printer)
        return False

    def _hint_soon(self) -> None:
        if self._hint is not None:
            self._hint.cancel()
        loop = asyncio.get_running_loop()
        self._hint = loop.call_later(0.3, self.model.notice, ATTACH_HINT, SERVER_WINDOW)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.wait if self.config.wait > 0 else float("inf")

    async def _until_synced(self) -> bool:
        """Wait for a live session (commands need one); False after ``--wait`` seconds."""
        deadline = self._deadline()
        # Polling: these change in network callbacks, a few times per second at most.
        while not self.connection.synced and not self.quit.is_set():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return self.connection.synced

    async def _drain(self) -> None:
        """Wait until every message is acknowledged (or refused) and every command
        answered, at most ``--wait`` s."""
        deadline = self._deadline()
        connection = self.connection
        while (connection.outbox or connection.unanswered) and not self.quit.is_set():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self._give_up()

    def _give_up(self, *, unsent_line: bool = False) -> None:
        """Set the exit status and say, on stderr, what was not delivered and why."""
        problems = [f"{reason}" for reason in self.connection.refused.values()]
        problems += ["refused before sending"] * self.controller.refused_lines
        problems += self.controller.refused_commands
        connection = self.connection
        problems += [
            f"/join #{room} not answered within {self.config.wait:g}s"
            for room in sorted(connection.rejoining)
        ]
        if connection.awaiting:
            unanswered = len(connection.awaiting)
            problems.append(f"{unanswered} command(s) not answered within {self.config.wait:g}s")
        waiting = len(self.connection.outbox)
        if waiting or unsent_line:
            count = f"{waiting or 'a'} message{'s' if waiting > 1 else ''}"
            if self.exit_code in (EXIT_NICK, EXIT_STATE):
                problems.append(f"{count} not sent: the nick could not be used (see above)")
            else:
                why = self.connection.status.detail or "no answer from the server"
                problems.append(f"{count} not acknowledged within {self.config.wait:g}s ({why})")
        if problems:
            if not self.exit_code:
                self.exit_code = EXIT_UNDELIVERED
            print(
                "chat-client: not everything was delivered: " + "; ".join(problems),
                file=sys.stderr,
                flush=True,
            )

    async def _run_ui(self) -> None:
        try:
            from chat_client.tui import ChatUI  # prompt_toolkit is only needed here
        except ModuleNotFoundError as exc:
            raise SystemExit(
                f"chat-client: the full-screen UI needs {exc.name}, which is not installed: "
                "pip install 'compose-chat[client]' (or use --mode line)"
            ) from None

        config = self.config
        ui = ChatUI(self.model, self.controller, seconds=config.seconds, title=config.title)
        was_interactive, self.controller.interactive = self.controller.interactive, True
        self.controller.on_change = ui.refresh
        self.ui_active = True
        self._ui_exit = asyncio.Event()
        waits = [
            asyncio.create_task(self.quit.wait()),
            asyncio.create_task(self._ui_exit.wait()),
        ]
        for wait in waits:
            wait.add_done_callback(lambda _: ui.exit())
        try:
            await ui.run()
        finally:
            for wait in waits:
                wait.cancel()
            self.ui_active = False
            self._ui_exit = None
            self.controller.on_change = lambda: None
            self.controller.question = None
            self.controller.interactive = was_interactive
            # The full-screen UI may be streamed to a log (an attached replica): end its
            # last line, so that the terminal-restoring sequences are not left unprinted.
            print(flush=True, file=self.stdout)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    client = ChatClient(config, sys.stdin, sys.stdout)
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(client.run())
    sys.exit(code)


if __name__ == "__main__":
    main()
