"""The connection layer (chat_server.connections) on its own, with a small test handler.

Real sockets on 127.0.0.1 and real websockets clients; raw sockets where a client must
misbehave (half-open, silent, oversized handshakes).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from chat_server.connections import (
    Connection,
    Message,
    WebSocketServer,
    _payload,
    frame_text,
    text_frames,
)


class App:
    """Builds handlers and records what happened to them."""

    def __init__(self) -> None:
        self.handlers: list[Recorder] = []
        self.release = asyncio.Event()
        self.cancelled = 0
        self.health_calls = 0

    def open(self, connection: Connection, request: Request) -> Recorder:
        handler = Recorder(self, connection, request.path)
        self.handlers.append(handler)
        return handler

    async def respond(self, connection: Connection, request: Request) -> Response | None:
        if request.path != "/healthz":
            # A stand-in for X-Forwarded-For from a trusted proxy.
            client = request.headers.get("X-Test-Client")
            if client is not None:
                connection.ip = client
            return None
        self.health_calls += 1
        await asyncio.sleep(0.01)  # answered later, as a store probe would be
        return connection.respond(HTTPStatus.OK, "OK\n")

    async def closed_codes(self, count: int, timeout: float = 5.0) -> list[tuple[int, str]]:
        async with asyncio.timeout(timeout):
            while sum(h.closed_with is not None for h in self.handlers) < count:
                await asyncio.sleep(0.01)
        return [h.closed_with for h in self.handlers if h.closed_with is not None]


class Recorder:
    """Echoes text. ``wait`` and ``bulk:...`` have work to finish before the next
    message, as a session does: they hold messages back and run a task meanwhile."""

    def __init__(self, app: App, connection: Connection, path: str) -> None:
        self.app = app
        self.connection = connection
        self.path = path
        self.closed_with: tuple[int, str] | None = None
        self.task: asyncio.Task[None] | None = None
        self.concurrent = 0
        self.most_concurrent = 0
        if path == "/deadline":
            connection.close_after(0.3, 1008, "no hello in time")

    def received(self, message: Message) -> None:
        assert self.task is None, "a message was handed over while the handler held them"
        if isinstance(message, bytes):
            self.connection.write([b"binary:%d" % len(message)])
        elif message == "wait":
            self._start(self._wait())
        elif message == "hello":
            self.connection.close_after(None)
            self.connection.write([b"welcome"])
        elif message == "boom":
            raise RuntimeError("a bug in one request")
        elif message == "async-boom":
            self.connection.spawn(self._boom())
        elif message.startswith("bulk:"):
            _, count, size, drain = message.split(":")
            self._start(self._bulk(int(count), int(size), drain == "drain"))
        elif message.startswith("framed:"):  # framed once, as the hub does for a room
            sizes = [int(size) for size in message.split(":")[1].split(",")]
            self.connection.write([b"before"])
            self.connection.write_framed([frame_text(b"\xc3\xa9" * (n // 2)) for n in sizes])
            self.connection.write([b"after"])
        elif message.startswith("defer:"):  # frames kept back, then something else
            _, then = message.split(":")
            before = self.connection.buffered()
            self.connection.defer_framed([frame_text(b"kept 1"), frame_text(b"kept 2")])
            kept = self.connection.buffered() - before
            if then == "write":
                self.connection.write([b"kept %d bytes" % kept])
            elif then == "flush":
                self.connection.flush()
                self.connection.write([b"flushed"])
            elif then == "close":
                self.connection.close(1000, "bye")
        elif message.startswith("limit:"):  # write until too much waits, as the hub does
            _, count, size, limit = message.split(":")
            frame = b"x" * int(size)
            for _ in range(int(count)):
                self.connection.write([frame])
                if self.connection.buffered() > int(limit):
                    self.connection.close(1008, "too slow")
                    break
        else:
            self.connection.write([message.encode()])

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        self.connection.pause_reading()
        self.task = self.connection.spawn(self._then_resume(work))

    async def _then_resume(self, work: Coroutine[Any, Any, None]) -> None:
        await work
        self.task = None
        self.connection.resume_reading()

    async def _wait(self) -> None:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await self.app.release.wait()
            self.connection.write([b"waited"])
        except asyncio.CancelledError:
            self.app.cancelled += 1
            raise
        finally:
            self.concurrent -= 1

    async def _boom(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("a bug in one awaiting request")

    async def _bulk(self, count: int, size: int, drain: bool) -> None:
        frame = b"x" * size
        for _ in range(count):
            self.connection.write([frame])
            if drain:
                await self.connection.drain()
        self.connection.write([b"bulk done"])

    def closed(self, code: int, reason: str) -> None:
        assert self.closed_with is None, "closed() twice"
        self.closed_with = (code, reason)
        if self.task is not None:
            self.task.cancel()


@asynccontextmanager
async def layer(**options: Any) -> AsyncIterator[tuple[WebSocketServer, App]]:
    app = App()
    settings: dict[str, Any] = {"max_size": 64 * 1024, "tick": 0.05, **options}
    server = WebSocketServer(app.open, responder=app.respond, **settings)
    await server.listen("127.0.0.1", 0)
    try:
        yield server, app
    finally:
        await server.shutdown(grace=0.5)


def ws_url(server: WebSocketServer, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def closed_code(ws: ClientConnection, timeout: float = 5.0) -> int:
    """Read until the server closes; the code of the close frame it sent."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code


async def ended(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed this raw connection (EOF, or a reset after it)."""
    try:
        return await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionResetError:
        return True


async def raw_request(port: int, request: bytes, source: str | None = None) -> bytes:
    local = (source, 0) if source is not None else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(65536)
    finally:
        writer.close()


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


# --- messages ------------------------------------------------------------------------


async def test_text_binary_and_fragmented_messages() -> None:
    async with layer() as (server, _), connect(ws_url(server)) as ws:
        await ws.send("plain")
        assert await ws.recv() == "plain"
        await ws.send(["frag", "ment", "ed ☃"])  # one message in three frames
        assert await ws.recv() == "fragmented ☃"
        await ws.send(b"\x00\x01\x02")
        assert await ws.recv() == "binary:3"
        await ws.send([b"ab", b"cd"])
        assert await ws.recv() == "binary:4"
        pong = await ws.ping()
        async with asyncio.timeout(2):
            await pong  # pings are answered


async def test_message_over_max_size_is_closed_with_1009() -> None:
    async with layer() as (server, app):
        async with connect(ws_url(server), max_size=None) as ws:
            await ws.send("x" * (64 * 1024 + 1))
            assert await closed_code(ws) == 1009
        async with connect(ws_url(server), max_size=None) as ws:
            await ws.send(["y" * 40_000, "y" * 40_000])  # each frame fits, the message not
            assert await closed_code(ws) == 1009
        async with connect(ws_url(server)) as ws:
            await ws.send("still serving")
            assert await ws.recv() == "still serving"
        assert [code for code, _ in await app.closed_codes(3)][:2] == [1009, 1009]


async def test_invalid_utf8_is_closed_with_1007() -> None:
    async with layer() as (server, app), connect(ws_url(server)) as ws:
        await ws.send(b"\xff\xfe", text=True)
        assert await closed_code(ws) == 1007
        assert (await app.closed_codes(1))[0][0] == 1007


async def test_a_failing_request_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "chat_server.connections")
    async with layer() as (server, _), connect(ws_url(server)) as ws:
        await ws.send("boom")
        await ws.send("async-boom")
        await ws.send("next")
        assert await ws.recv() == "next"
    failures = [r for r in caplog.records if r.exc_info and "failed" in r.getMessage()]
    assert len(failures) == 2, caplog.text


# --- one request at a time, no task when idle ------------------------------------------


async def test_held_messages_wait_in_order_and_a_long_inbox_pauses_reading() -> None:
    async with layer(inbox_limit=16) as (server, app), connect(ws_url(server)) as ws:
        count = 20_000  # about 200 KiB of tiny frames, sent at once
        await ws.send("wait")
        for n in range(count):
            await ws.send(f"m{n}")
        await ws.send("wait")
        await ws.send("last")
        await asyncio.sleep(0.3)
        (connection,) = server.connections
        handler = app.handlers[0]
        assert connection.transport is not None
        assert not connection.transport.is_reading(), "a long inbox must pause reading"
        # What was read past the inbox stays bytes: at most a slice's frames are parsed.
        assert connection._inbox is not None and len(connection._inbox) <= 16 + 4096 // 6
        app.release.set()
        async with asyncio.timeout(20):
            replies = [await ws.recv() for _ in range(count + 3)]
        assert replies == ["waited", *[f"m{n}" for n in range(count)], "waited", "last"]
        assert handler.most_concurrent == 1
        assert connection.transport.is_reading()
        assert connection._inbox is None


async def test_idle_connections_hold_no_task() -> None:
    async with layer() as (server, app):
        before = len(asyncio.all_tasks())
        clients = [await connect(ws_url(server), ping_interval=None) for _ in range(50)]
        try:
            for ws in clients:
                await ws.send("hi")
                assert await ws.recv() == "hi"
            app.release.set()
            await clients[0].send("wait")  # work that awaits: a task while it runs
            assert await clients[0].recv() == "waited"
            await asyncio.sleep(0.05)
            # The clients' own tasks are not counted: websockets' client has none idle
            # either when its keepalive is off. The server side must hold none at all.
            assert len(asyncio.all_tasks()) == before
            assert not server.tasks
            assert all(c._inbox is None for c in server.connections)
        finally:
            for ws in clients:
                await ws.close()


async def test_pending_work_is_cancelled_when_the_client_goes() -> None:
    async with layer() as (server, app):
        async with connect(ws_url(server)) as ws:
            await ws.send("wait")
            await ws.send("queued behind it")
            await asyncio.sleep(0.1)
        assert await app.closed_codes(1) == [(1000, "")]
        await asyncio.sleep(0.05)
        assert app.cancelled == 1
        assert not server.tasks


# --- handshakes -------------------------------------------------------------------------


async def test_responder_answers_plain_http_and_the_per_address_limit_answers_429() -> None:
    async with layer(max_connections_per_address=3) as (server, app):
        opened = [await connect(ws_url(server)) for _ in range(3)]
        try:
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url(server))
            assert refused.value.response.status_code == 429
            # Connections are counted from accept on: even /healthz, from that address.
            health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            reply = await raw_request(server.port, health)
            assert reply.startswith(b"HTTP/1.1 429 ")
            # Other addresses are not affected.
            reply = await raw_request(server.port, health, source="127.0.0.2")
            assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"OK\n")
            assert app.health_calls == 1
        finally:
            await opened.pop().close()
        await asyncio.sleep(0.1)
        async with connect(ws_url(server)) as ws:  # room again once one closed
            await ws.send("in")
            assert await ws.recv() == "in"
        for ws in opened:
            await ws.close()


async def test_the_limit_counts_the_address_the_responder_gives() -> None:
    async with layer(max_connections_per_address=1) as (server, _):
        url = ws_url(server)
        async with (
            connect(url, additional_headers={"X-Test-Client": "10.0.0.1"}),
            connect(url, additional_headers={"X-Test-Client": "10.0.0.2"}),
        ):
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers={"X-Test-Client": "10.0.0.1"})
            assert refused.value.response.status_code == 429
            await asyncio.sleep(0.05)  # the refused one is counted until it has closed
            assert server.per_address == {"10.0.0.1": 1, "10.0.0.2": 1}
        await asyncio.sleep(0.05)
        assert server.per_address == {}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (HANDSHAKE + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),  # one huge line
        (HANDSHAKE + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 4000) for n in range(5)), b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"426"),  # plain HTTP, not a WebSocket
        (HANDSHAKE.replace(b"13", b"8") + b"\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
    ],
)
async def test_bad_handshakes_are_refused(request_bytes: bytes, status: bytes) -> None:
    async with layer() as (server, _):
        reply = await raw_request(server.port, request_bytes)
        assert reply.split(b" ", 2)[1] == status, reply[:200]
        async with connect(ws_url(server)) as ws:
            await ws.send("unaffected")
            assert await ws.recv() == "unaffected"


async def open_from(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection from ``source`` that sends nothing."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def test_silent_sockets_count_against_the_per_address_limit_from_accept() -> None:
    """Sockets that never send a handshake count too: past the limit a socket is refused
    429 at once, before it says a word; past twice the limit it is reset."""
    async with layer(max_connections_per_address=4, handshake_timeout=10.0) as (server, _):
        silent = [await open_from(server.port, "127.0.0.5") for _ in range(4)]
        reader, writer = await open_from(server.port, "127.0.0.5")
        silent.append((reader, writer))
        async with asyncio.timeout(1):  # not after the 10 s handshake timeout
            reply = await reader.read()
        assert reply.startswith(b"HTTP/1.1 429 "), reply
        assert b"too many connections from 127.0.0.5 (limit 4)" in reply
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(server), local_addr=("127.0.0.5", 0))
        assert refused.value.response.status_code == 429
        silent += [await open_from(server.port, "127.0.0.5") for _ in range(40)]
        await asyncio.sleep(0.1)
        held = sum(c.ip == "127.0.0.5" for c in server.connections)
        assert held <= 8, f"{held} connections held for one address with a limit of 4"
        async with connect(ws_url(server), local_addr=("127.0.0.6", 0)) as ws:
            await ws.send("others are fine")
            assert await ws.recv() == "others are fine"
        for _, w in silent:
            w.close()


async def test_a_trusted_proxys_connections_are_limited_by_client_not_at_accept() -> None:
    """Behind HAProxy every connection comes from one address: a burst of more than the
    limit in their handshakes at once is not refused for it; each client is limited once
    its request names it."""
    async with layer(
        max_connections_per_address=4,
        handshake_timeout=10.0,
        proxy=lambda ip: ip == "127.0.0.7",
    ) as (server, _):
        pending = [await open_from(server.port, "127.0.0.7") for _ in range(12)]
        await asyncio.sleep(0.1)
        assert sum(c.ip == "127.0.0.7" for c in server.connections) == 12
        clients = [
            await connect(
                ws_url(server),
                local_addr=("127.0.0.7", 0),
                additional_headers={"X-Test-Client": f"10.0.0.{n}"},
            )
            for n in range(12)
        ]

        # Each client still has its own limit: 10.0.0.1 holds one, three more, then 429.
        def as_first() -> Any:
            return connect(
                ws_url(server),
                local_addr=("127.0.0.7", 0),
                additional_headers={"X-Test-Client": "10.0.0.1"},
            )

        clients += [await as_first() for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await as_first()
        assert refused.value.response.status_code == 429
        for ws in clients:
            await ws.close()
        for _, w in pending:
            w.close()


async def test_past_max_connections_the_oldest_handshake_makes_room() -> None:
    """When connections would use up the file descriptors, the oldest one still in its
    handshake is dropped for a new one: silent sockets cannot lock everyone out."""
    async with layer(max_connections=8, handshake_timeout=10.0) as (server, _):
        silent = [await open_from(server.port, f"127.0.1.{n}") for n in range(1, 9)]
        async with connect(ws_url(server)) as ws:
            await ws.send("in")
            assert await ws.recv() == "in"
            assert await ended(silent[0][0]), "the oldest silent socket made room"
            # A full house of open WebSockets and silent sockets: the silent go first.
            more = [await open_from(server.port, f"127.0.2.{n}") for n in range(1, 9)]
            await asyncio.sleep(0.1)
            assert len(server.connections) <= 8
            await ws.send("still in")
            assert await ws.recv() == "still in"
        for _, w in silent + more:
            w.close()


async def test_garbage_instead_of_a_handshake_is_closed() -> None:
    async with layer() as (server, _):
        reply = await raw_request(server.port, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert reply == b""
        await asyncio.sleep(0.05)
        assert not server.connections


async def test_half_open_and_slow_handshakes_time_out() -> None:
    async with layer(handshake_timeout=0.4) as (server, _):
        loop = asyncio.get_running_loop()
        idle = []
        for _ in range(20):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            idle.append(sock)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        try:
            for byte in HANDSHAKE:  # a byte at a time: data alone does not extend the deadline
                writer.write(bytes([byte]))
                await asyncio.sleep(0.01)
                if writer.is_closing() or reader.at_eof():
                    break
            assert await ended(reader)
            assert time.monotonic() - started < 1.5
            for sock in idle:
                assert await asyncio.wait_for(loop.sock_recv(sock, 1), 2) == b""
        finally:
            writer.close()
            for sock in idle:
                sock.close()
        await asyncio.sleep(0.05)
        assert not server.connections


async def test_tcp_is_closed_as_soon_as_the_closing_handshake_is_done() -> None:
    """A client that sends its close frame and then keeps the socket open costs nothing:
    the server closes TCP first (RFC 6455 7.1.1) instead of waiting for close_timeout."""
    async with layer(close_timeout=10.0) as (server, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(HANDSHAKE + b"\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            close = Frame(Opcode.CLOSE, Close(1000, "bye").serialize())
            writer.write(close.serialize(mask=True))
            async with asyncio.timeout(1):
                echo = await reader.read()  # the server's close frame, then EOF
            assert echo.endswith(b"bye")
            assert await app.closed_codes(1, timeout=1) == [(1000, "bye")]
            await asyncio.sleep(0.05)
            assert not server.connections
        finally:
            writer.close()


# --- deadlines and keepalive ------------------------------------------------------------


async def test_close_after_closes_unless_cleared() -> None:
    async with layer() as (server, app):
        async with connect(ws_url(server, "/deadline")) as late:
            assert await closed_code(late, timeout=2) == 1008
        async with connect(ws_url(server, "/deadline")) as prompt:
            await prompt.send("hello")
            assert await prompt.recv() == "welcome"
            await asyncio.sleep(0.6)
            await prompt.send("still open")
            assert await prompt.recv() == "still open"
        assert (await app.closed_codes(2)) == [(1008, "no hello in time"), (1000, "")]


async def test_keepalive_keeps_answering_clients_and_closes_silent_ones_with_1011() -> None:
    async with layer(ping_interval=0.2, ping_timeout=0.2) as (server, app):
        async with (
            connect(ws_url(server), ping_interval=None) as alive,
            connect(ws_url(server), ping_interval=None) as silent,
        ):
            assert silent.transport is not None
            silent.transport.pause_reading()  # never sees the pings, never answers
            await asyncio.sleep(1.2)
            assert [h.closed_with for h in app.handlers] == [None, (1011, "keepalive ping timeout")]
            await alive.send("alive")
            assert await alive.recv() == "alive"
            silent.transport.resume_reading()
            assert await closed_code(silent) == 1011


# --- writing: frames framed once for many connections ----------------------------------------

#: Payload lengths around each of the three header sizes (7-bit, 16-bit, 64-bit length).
FRAME_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def opened_pair(offer_deflate: bool) -> tuple[ClientProtocol, ServerProtocol]:
    """A client and a server Sans-I/O protocol after an in-memory handshake; the server
    offers permessage-deflate only when ``offer_deflate`` (the chat server never does)."""
    client = ClientProtocol(
        parse_uri("ws://127.0.0.1/"), extensions=[ClientPerMessageDeflateFactory()]
    )
    server = ServerProtocol(
        extensions=[ServerPerMessageDeflateFactory()] if offer_deflate else None
    )
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    (request,) = server.events_received()
    server.send_response(server.accept(cast(Request, request)))
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    return client, server


@pytest.mark.parametrize("size", FRAME_SIZES)
def test_frame_text_is_what_websockets_sends_on_a_connection_without_extensions(
    size: int,
) -> None:
    client, server = opened_pair(offer_deflate=False)
    assert not server.extensions and not client.extensions
    data = ("é" * size).encode()[:size]
    framed = frame_text(data)
    server.send_text(data)
    assert framed == b"".join(server.data_to_send())
    assert _payload(framed) == data
    client.receive_data(framed)
    (frame,) = client.events_received()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.TEXT and frame.fin
    assert frame.data == data


async def test_framed_frames_reach_the_client_in_order_with_other_writes() -> None:
    sizes = [2, 126, 65536, 70000, 0]
    async with layer() as (server, _), connect(ws_url(server), max_size=2**20) as ws:
        assert ws.protocol.extensions == [], "the layer negotiates no extension by default"
        await ws.send("framed:" + ",".join(map(str, sizes)))
        assert await ws.recv() == "before"
        for size in sizes:
            assert await ws.recv() == "é" * (size // 2)
        assert await ws.recv() == "after"


async def test_deferred_frames_go_before_whatever_is_written_after_them() -> None:
    async with layer() as (server, _), connect(ws_url(server)) as ws, asyncio.timeout(5):
        await ws.send("defer:write")
        assert [await ws.recv() for _ in range(3)] == ["kept 1", "kept 2", "kept 16 bytes"]
        await ws.send("defer:flush")
        assert [await ws.recv() for _ in range(3)] == ["kept 1", "kept 2", "flushed"]
        await ws.send("echo")  # nothing was left behind
        assert await ws.recv() == "echo"
        await ws.send("defer:close")
        assert [await ws.recv() for _ in range(2)] == ["kept 1", "kept 2"]
        assert await closed_code(ws) == 1000


async def deflate_client(port: int, request: str) -> tuple[list[str], int]:
    """Connect offering permessage-deflate, send one text message, read until "after":
    the text messages received, and how many bytes they took on the wire."""
    client = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:{port}/"), extensions=[ClientPerMessageDeflateFactory()]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        client.send_request(client.connect())
        writer.write(b"".join(client.data_to_send()))
        async with asyncio.timeout(5):
            while not client.events_received():  # the handshake's response
                client.receive_data(await reader.read(65536))
            client.send_text(request.encode())
            writer.write(b"".join(client.data_to_send()))
            texts: list[str] = []
            wire = 0
            while not texts or texts[-1] != "after":
                data = await reader.read(65536)
                assert data, "the server closed the connection"
                wire += len(data)
                client.receive_data(data)
                texts += [e.data.decode() for e in client.events_received() if isinstance(e, Frame)]
        return texts, wire
    finally:
        writer.close()


@pytest.mark.parametrize("deflate", [False, True])
async def test_a_connection_with_compression_compresses_framed_frames(deflate: bool) -> None:
    """Pre-framed bytes are for connections without extensions; a connection that
    negotiated permessage-deflate gets each payload framed (and compressed) for it."""
    sizes = [100, 60000, 70000]
    extensions = [ServerPerMessageDeflateFactory()] if deflate else None
    async with layer(extensions=extensions) as (server, _):
        texts, wire = await deflate_client(server.port, "framed:" + ",".join(map(str, sizes)))
    assert texts == ["before", *("é" * (size // 2) for size in sizes), "after"]
    if deflate:
        assert wire < 2000, f"{wire} bytes on the wire: not compressed"
    else:
        assert wire > sum(sizes), "without extensions the frames go as they are"


# --- writing: pacing and slow readers ------------------------------------------------------


async def test_drain_paces_a_big_write_to_a_slow_reader() -> None:
    async with layer() as (server, app):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        async with connect(ws_url(server), sock=sock, max_queue=4) as ws:
            await ws.send("bulk:160:65536:drain")  # 10 MiB: past what the kernel holds
            for _ in range(160):
                assert len(await ws.recv()) == 65536
                await asyncio.sleep(0.002)  # a client that reads, slowly
            assert await ws.recv() == "bulk done"
        assert (await app.closed_codes(1)) == [(1000, "")]


async def test_what_a_reader_leaves_unread_is_buffered_and_closing_it_is_at_once() -> None:
    limit = 256 * 1024
    async with layer(close_timeout=5.0) as (server, app):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        stuck = await connect(ws_url(server), sock=sock)
        try:
            async with connect(ws_url(server)) as other:
                assert stuck.transport is not None
                stuck.transport.pause_reading()
                started = time.monotonic()
                await stuck.send(f"limit:320:32768:{limit}")  # 10 MiB: past what the kernel holds
                code, reason = (await app.closed_codes(1))[0]
                assert (code, reason) == (1008, "too slow")
                assert time.monotonic() - started < 1.0, "told at once, not after close_timeout"
                await other.send("others are fine")
                assert await other.recv() == "others are fine"
        finally:
            stuck.transport.abort()  # it would wait for its own close timeout


@pytest.mark.parametrize("first", ["client", "server"])
async def test_a_closing_handshake_to_a_peer_that_never_reads_ends_at_close_timeout(
    first: str,
) -> None:
    """With megabytes waiting for a client that does not read, the close frame can never
    be sent: the TCP connection is aborted after close_timeout, whoever began closing."""
    loop = asyncio.get_running_loop()
    async with layer(close_timeout=0.5) as (server, app):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, HANDSHAKE + b"\r\n")
            assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
            if first == "client":  # 4 MiB it never reads, then its close frame
                bulk = Frame(Opcode.TEXT, b"bulk:64:65536:nodrain")
                await loop.sock_sendall(sock, bulk.serialize(mask=True))
                await asyncio.sleep(0.2)
                close = Frame(Opcode.CLOSE, Close(1000, "bye").serialize())
                await loop.sock_sendall(sock, close.serialize(mask=True))
                expected = (1000, "bye")
            else:  # the server closes it as too slow
                flood = Frame(Opcode.TEXT, b"limit:64:65536:100000")
                await loop.sock_sendall(sock, flood.serialize(mask=True))
                expected = (1008, "too slow")
            started = time.monotonic()
            assert await app.closed_codes(1, timeout=1) == [expected]
            while server.connections and time.monotonic() - started < 5:
                await asyncio.sleep(0.02)
            took = time.monotonic() - started
            assert not server.connections
            assert 0.4 < took < 1.5, f"TCP dropped after {took:.2f} s, close_timeout 0.5 s"
        finally:
            sock.close()


# --- shutdown -------------------------------------------------------------------------------


async def test_shutdown_closes_open_aborts_the_rest_and_waits_for_work() -> None:
    app = App()
    server = WebSocketServer(app.open, responder=app.respond, close_timeout=10.0, tick=0.05)
    await server.listen("127.0.0.1", 0)
    url = ws_url(server)
    loop = asyncio.get_running_loop()
    half_open = socket.socket()
    half_open.setblocking(False)
    await loop.sock_connect(half_open, ("127.0.0.1", server.port))
    partial = socket.socket()
    partial.setblocking(False)
    await loop.sock_connect(partial, ("127.0.0.1", server.port))
    await loop.sock_sendall(partial, HANDSHAKE[:40])
    idle = await connect(url, ping_interval=None)
    busy = await connect(url, ping_interval=None)
    silent = await connect(url, ping_interval=None)
    try:
        await busy.send("wait")
        assert silent.transport is not None
        silent.transport.pause_reading()  # will never answer the close
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await server.shutdown(grace=1.0)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"shutdown took {elapsed:.2f}s"
        assert not server.connections and not server.tasks
        assert app.cancelled == 1
        assert await closed_code(idle) == 1001
        assert await closed_code(busy) == 1001
        assert sorted(code for code, _ in await app.closed_codes(3)) == [1001, 1001, 1001]
        for sock in (half_open, partial):
            assert await asyncio.wait_for(loop.sock_recv(sock, 1), 2) == b""
        with pytest.raises(ConnectionRefusedError):
            await connect(url, open_timeout=2)
    finally:
        half_open.close()
        partial.close()
        for ws in (idle, busy, silent):
            ws.transport.abort()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frames_are_what_websockets_would_send(size: int) -> None:
    data = ("é" * size).encode()[:size]
    one = Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    other = Frame(Opcode.TEXT, b"x").serialize(mask=False, extensions=[])
    assert text_frames([data]) == one
    assert text_frames([data, b"x"]) == one + other
