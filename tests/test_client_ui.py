"""The full-screen UI driven by key presses (create_pipe_input + DummyOutput), wired to
the real controller and connection, against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output import DummyOutput

from chat_client.connection import ChatConnection
from chat_client.controller import Controller
from chat_client.model import ChatModel
from chat_client.secrets import SecretStore
from chat_client.tui import ChatUI
from tests.helpers import peer, server, url


def pane_text(ui: ChatUI) -> str:
    return "".join(text for _, text, *_ in ui._pane())


async def eventually(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


@asynccontextmanager
async def ui_client(
    chat_url: str, nick: str, state: Path, pipe: PipeInput
) -> AsyncIterator[tuple[ChatUI, ChatConnection]]:
    model = ChatModel(nick, "lobby")
    conn = ChatConnection(
        chat_url,
        nick,
        ["lobby"],
        SecretStore(state),
        on_frame=lambda f: None,
        on_status=lambda s: None,
    )
    controller = Controller(model, conn)
    conn.on_frame = controller.frame
    conn.on_status = controller.status
    ui = ChatUI(model, controller, input=pipe, output=DummyOutput())
    controller.on_quit = ui.exit
    controller.on_change = ui.refresh
    net = asyncio.create_task(conn.run())
    app = asyncio.create_task(ui.run())
    try:
        await eventually(lambda: conn.synced)
        yield ui, conn
    finally:
        ui.exit()
        conn.stop()
        await asyncio.gather(app, net)


async def test_typing_sending_receiving_completion_and_history(db: Path, tmp_path: Path) -> None:
    async with server(db) as chat:
        with create_pipe_input() as pipe:
            async with (
                ui_client(url(chat), "alice", tmp_path, pipe) as (ui, conn),
                peer(chat, "bob") as bob,
            ):
                pipe.send_text("hello bob\r")
                got = await bob.expect("msg")
                assert got["body"] == "hello bob"
                assert got["from"] == "alice"
                await eventually(lambda: not conn.outbox)

                await bob.say("hi alice, \x1b]0;owned\x07nice")
                await eventually(lambda: "hi alice, nice" in pane_text(ui))
                assert "\x1b" not in pane_text(ui)

                # Tab completes commands and nicks; Up recalls what was typed.
                pipe.send_text("/jo\t")
                await eventually(lambda: ui.buffer.text == "/join")
                pipe.send_text("\x15")  # Ctrl-U: clear the line
                await eventually(lambda: ui.buffer.text == "")
                pipe.send_text("b\t")
                await eventually(lambda: ui.buffer.text == "bob")
                pipe.send_text("\x15")  # Ctrl-U: clear the line
                await eventually(lambda: ui.buffer.text == "")
                pipe.send_text("\x1b[A")  # Up
                await eventually(lambda: ui.buffer.text == "hello bob")
                pipe.send_text("\x15")  # Ctrl-U: clear the line
                await eventually(lambda: ui.buffer.text == "")

                pipe.send_text("/join dev\r")
                await eventually(lambda: ui.model.active == "#dev")
                await eventually(lambda: ui.model.window("#dev").members == ["alice"])
                pipe.send_text("/msg bob a secret\r")
                dm = await bob.expect("msg")
                assert dm["to"] == "bob"
                assert ui.model.active == "@bob"
                status = "".join(text for _, text, *_ in ui._status())
                assert "alice" in status and "@bob" in status and "connected" in status
