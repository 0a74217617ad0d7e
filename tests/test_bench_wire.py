"""The benchmark client's own frame splitting: every mark counted once, however the
stream is cut into reads, and control frames answered through websockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.utils import accept_key

from bench.wire import Client, Stats


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def server_frame(opcode: Opcode, payload: bytes) -> bytes:
    """A frame as a server sends it (unmasked), serialized by websockets."""
    return Frame(opcode, payload).serialize(mask=False)


def stream(client: Client) -> tuple[bytes, int]:
    """The handshake response, then marked text frames of every header length, an
    unmarked frame and a ping; returns the bytes and the number of marks."""
    accept = accept_key(client.protocol.key)
    data = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
    ).encode()
    marks = 0
    for seq in range(4):
        for sender, size in ((0, 10), (1, 300), (2, 70_000)):  # 7-, 16- and 64-bit lengths
            body = f'{{"type":"msg","body":"b|{sender}|{seq}|{1000 + seq}|'.encode()
            data += server_frame(Opcode.TEXT, body + b"x" * size + b'"}')
            marks += 1
        data += server_frame(Opcode.TEXT, b'{"type":"presence"}')
        if seq == 1:
            data += server_frame(Opcode.PING, b"ping")
    return data, marks


@pytest.mark.parametrize("chunk", [1, 3, 7, 126, 4096, 1 << 20])
async def test_marks_counted_once_however_the_stream_is_cut(chunk: int) -> None:
    stats = Stats()
    client = Client("ws://127.0.0.1:9", stats, senders=3, on_frame=None)
    transport = Transport()
    client.connection_made(transport)
    data, marks = stream(client)
    for start in range(0, len(data), chunk):
        client.data_received(data[start : start + chunk])
    await asyncio.wait_for(client.opened, 1)
    assert stats.received == marks
    stats.tally()
    assert (stats.duplicated, stats.gaps) == (0, 0)
    assert client.last == [3, 3, 3]
    assert len(stats.latencies) == marks
    # The ping was answered with a (masked) pong carrying its payload.
    assert b"\x8a\x84" in transport.written


async def test_a_gap_and_a_duplicate_are_seen() -> None:
    stats = Stats()
    client = Client("ws://127.0.0.1:9", stats, senders=1, on_frame=None)
    client.connection_made(Transport())
    handshake, _ = stream(client)
    client.data_received(handshake[: handshake.index(b"\r\n\r\n") + 4])
    for seq in (0, 1, 3, 3):
        client.data_received(server_frame(Opcode.TEXT, f"b|0|{seq}|1|".encode()))
    stats.tally()
    assert (stats.received, stats.gaps, stats.duplicated) == (4, 1, 1)
