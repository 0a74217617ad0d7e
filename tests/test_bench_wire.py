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


def opened_client(stats: Stats, senders: int) -> Client:
    client = Client("ws://127.0.0.1:9", stats, senders=senders, on_frame=None)
    client.connection_made(Transport())
    handshake, _ = stream(client)
    client.data_received(handshake[: handshake.index(b"\r\n\r\n") + 4])
    return client


def marked(*marks: tuple[int, int, int]) -> bytes:
    """One read: a chat ``msg`` frame per mark (sender, seq, t_ns), then an ack."""
    data = b""
    for sender, seq, stamp in marks:
        body = f"b|{sender}|{seq}|{stamp}|".encode() + b"x" * 180
        data += server_frame(Opcode.TEXT, b'{"type":"msg","id":1,"body":"' + body + b'"}')
    return data + server_frame(Opcode.TEXT, b'{"type":"ack","cid":"c1","id":1}')


async def test_marks_are_counted_on_receipt_and_timed_by_their_read_at_the_tally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stats = Stats()
    client = opened_client(stats, senders=2)
    clock = iter([5_000, 9_000])
    monkeypatch.setattr("bench.wire.time.monotonic_ns", lambda: next(clock))
    client.data_received(marked((0, 0, 1_000), (1, 0, 2_000)))
    client.data_received(marked((0, 1, 3_000)))
    # Counted as they arrive (the drain waits on this); nothing parsed yet.
    assert stats.received == 3
    assert (len(stats.latencies), client.last) == (0, [-1, -1])
    stats.tally()
    # Each mark's latency is against the receive time of the read it came in.
    assert list(stats.latencies) == [4_000, 3_000, 6_000]
    assert client.last == [1, 0]
    assert (stats.duplicated, stats.gaps) == (0, 0)
    stats.tally()  # what was accounted for is not held any more
    assert len(stats.latencies) == 3


async def test_the_tally_checks_each_senders_order_across_reads_and_clients() -> None:
    stats = Stats()
    one, two = opened_client(stats, senders=1), opened_client(stats, senders=1)
    one.data_received(marked((0, 0, 1), (0, 2, 1)))  # 1 missing here ...
    two.data_received(marked((0, 0, 1), (0, 1, 1)))  # ... not for the other client
    one.data_received(marked((0, 1, 1)))  # late: after 2, so counted as a duplicate
    two.data_received(marked((0, 2, 1)))
    stats.tally()
    assert stats.received == 6
    assert (stats.gaps, stats.duplicated) == (1, 1)
    assert (one.last, two.last) == ([2], [2])


async def test_a_reset_drops_what_is_held() -> None:
    stats = Stats()
    client = opened_client(stats, senders=1)
    client.data_received(marked((0, 0, 1)))
    stats.reset()
    stats.tally()
    assert (stats.received, len(stats.latencies), client.last) == (0, 0, [-1])
