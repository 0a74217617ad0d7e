"""The generator's client: cheap per received frame, so the server is what saturates.

A benchmark client receives a hundred times more frames than it sends, so its receive
path is the generator's cost. ``websockets``' own client (``asyncio.client.connect``)
runs every frame through its Sans-I/O parser, an assembler, a queue and an ``await``;
even the Sans-I/O ``ClientProtocol`` alone costs about 3.5 times as much per frame as
what this module does (measured on this machine: 10.6 µs against 2.9 µs per frame).

So the work is split by what needs a library and what does not:

- the opening handshake, masking of every frame we send, pings, pongs and the closing
  handshake go through websockets' Sans-I/O ``ClientProtocol``: nothing of the protocol
  is re-implemented here;
- received *text* frames are only split off the stream here (server-to-client frames are
  never masked, and this server never fragments), and each read's complete frames are
  searched for benchmark marks in one C call (``re.findall``). Control frames are handed,
  whole, to the ``ClientProtocol``, which answers pings and closes as it should.

On receipt a read costs only what must happen then: the frames split off, the marks found
(one ``re.findall``, one ``bytes.join``) and kept with the read's receive time. What each
mark says (its latency, and loss, duplication and order per sender) is worked out later,
by :meth:`Stats.tally`, exactly as on receipt (same receive time, every mark, in arrival
order), but after the measured window: at saturation that per-mark Python was about half
of the generator's core, and the generator's core is what must not run out first.

Every benchmark body carries a mark ``b|sender|seq|t_ns|``: ``t_ns`` is the sender's
``time.monotonic_ns()``, a system-wide clock, so latency is exact across the generator's
processes too.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from array import array
from collections.abc import Callable
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

MARK = re.compile(rb"b\|(\d+)\|(\d+)\|(\d+)\|")
#: The same marks, whole: one bytes object per mark, the cheapest thing ``findall`` makes.
MARK_SPAN = re.compile(rb"b\|\d+\|\d+\|\d+\|")
#: A FIN text frame's first byte: what this server sends everything but control frames in.
TEXT = 0x81

_u16 = struct.Struct(">H").unpack_from
_head = struct.Struct(">BBH").unpack_from  # first byte, length byte, 16-bit length
_u64 = struct.Struct(">Q").unpack_from

#: Called with each complete text frame's payload when a client is in frame mode.
OnFrame = Callable[["Client", bytes], None]


class Stats:
    """What the receivers of one process saw in marked frames.

    ``received`` counts marks as they arrive. Each read's marks (joined), its client and
    its receive time are held until :meth:`tally` accounts for them: in a list of bytes,
    a list of clients and an array, not in a tuple per read, so that what is held gives
    the garbage collector nothing new to track (a tuple per read made its full
    collections walk every read held, tens of milliseconds at a time, mid-step).
    """

    __slots__ = (
        "duplicated",
        "gaps",
        "held",
        "held_at",
        "held_by",
        "latencies",
        "received",
        "times",
    )

    def __init__(self) -> None:
        self.received = 0
        self.duplicated = 0
        self.gaps = 0
        self.latencies = array("q")  # ns
        self.times = array("q")  # receive times (ns), where a workload needs them
        self.held: list[bytes] = []
        self.held_by: list[Client] = []
        self.held_at = array("q")

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def hold(self, client: Client, now: int, marks: list[bytes]) -> None:
        """Keep one read's marks (found, not yet parsed), received at ``now``."""
        self.received += len(marks)
        self.held.append(b"".join(marks))
        self.held_by.append(client)
        self.held_at.append(now)

    def tally(self) -> None:
        """Account for the held marks, read by read in arrival order: each mark's latency
        against its read's receive time, and each client's sequence check per sender."""
        held = zip(self.held_by, self.held_at, self.held, strict=True)
        self.held, self.held_by, self.held_at = [], [], array("q")
        for client, now, marks in held:
            client.see(MARK.findall(marks), now)


class Client(asyncio.Protocol):
    """One WebSocket connection of the generator.

    ``last[sender]`` is the last sequence number seen from each sender: a receiver checks
    every marked frame against it for loss (a gap), duplication and order.
    """

    def __init__(self, url: str, stats: Stats, senders: int, on_frame: OnFrame | None) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.stats = stats
        self.last = [-1] * senders
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        # An incomplete frame's bytes so far, and how many it takes to finish it: a big
        # frame arriving in many reads is joined once, not copied at every read.
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.needed = 0
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.data: dict[str, Any] = {}  # per-workload state
        #: Failed with the close reason if the connection ends before it is done.
        self.waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.pending:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size < self.needed:
                return
            data = b"".join(self.pending)
            self.pending.clear()
        if self.protocol.state is State.CONNECTING:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._keep(data, len(data) + 1)
                return
            self.protocol.receive_data(data[: end + 4])
            self.protocol.events_received()
            if not self._open():
                exc = self.protocol.handshake_exc or ConnectionError("handshake failed")
                if not self.opened.done():
                    self.opened.set_exception(exc)
                self.abort()
                return
            if not self.opened.done():
                self.opened.set_result(None)
            data = data[end + 4 :]
        now = time.monotonic_ns()
        on_frame = self.on_frame
        pos, n, control = 0, len(data), False
        if on_frame is None:
            # Marks only: step over the text frames (7- or 16-bit length) nearly every
            # read is made of in as few operations as possible; the general loop below
            # goes on from the first other frame or the last incomplete one.
            while True:
                end = pos + 4
                if end > n:
                    break
                first, length, extended = _head(data, pos)
                if length == 126:
                    end += extended
                elif length < 126:
                    end += length - 2
                else:
                    break
                if end > n or first != TEXT:
                    break
                pos = end
        # Split off complete frames: 2-byte header, 16- or 64-bit extended length.
        needed = 2  # bytes from pos that the next frame takes, as far as is known
        while n - pos >= 2:
            length = data[pos + 1]
            head = 2
            if length == 126:
                if n - pos < 4:
                    needed = 4
                    break
                length = _u16(data, pos + 2)[0]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    needed = 10
                    break
                length = _u64(data, pos + 2)[0]
                head = 10
            end = pos + head + length
            if end > n:
                needed = head + length
                break
            if data[pos] != TEXT:
                control = True
            elif on_frame is not None:
                on_frame(self, data[pos + head : end])
            pos = end
        if pos < n:
            self._keep(data[pos:], needed)
        if on_frame is None and pos:
            found = MARK_SPAN.findall(data, 0, pos)
            if found:
                self.stats.hold(self, now, found)
        if control:
            self._control(data, pos)

    def _keep(self, rest: bytes, needed: int) -> None:
        self.pending = [rest]
        self.pending_size = len(rest)
        self.needed = needed

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if self.waiter is not None and not self.waiter.done():
            code, reason = self.protocol.close_code, self.protocol.close_reason
            self.waiter.set_exception(ConnectionError(f"closed by the server: {code} {reason}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _open(self) -> bool:
        # A method, so that type checkers do not narrow ``state`` across the handshake.
        return self.protocol.state is State.OPEN

    # --- receiving ---------------------------------------------------------------------

    def see(self, marks: list[tuple[bytes, bytes, bytes]], now: int) -> None:
        """Account for marks received at ``now`` (counted in ``received`` on arrival)."""
        stats, last = self.stats, self.last
        add = stats.latencies.append
        for sender_b, seq_b, stamp_b in marks:
            add(now - int(stamp_b))
            sender, seq = int(sender_b), int(seq_b)
            before = last[sender]
            if seq == before + 1:
                last[sender] = seq
            elif seq <= before:
                stats.duplicated += 1
            else:
                stats.gaps += seq - before - 1
                last[sender] = seq

    def see_seq(self, sender: int, seq: int) -> None:
        """Account for a marked frame whose latency does not count (a replayed one)."""
        before = self.last[sender]
        if seq == before + 1:
            self.last[sender] = seq
        elif seq <= before:
            self.stats.duplicated += 1
        else:
            self.stats.gaps += seq - before - 1
            self.last[sender] = seq

    def _control(self, data: bytes, end: int) -> None:
        """Give every control frame among ``data[:end]`` to the Sans-I/O protocol."""
        pos = 0
        while pos < end:
            length, head = data[pos + 1], 2
            if length == 126:
                length, head = _u16(data, pos + 2)[0], 4
            elif length == 127:
                length, head = _u64(data, pos + 2)[0], 10
            if data[pos] != TEXT:
                self.protocol.receive_data(data[pos : pos + head + length])
                self.protocol.events_received()  # the protocol answers pings and closes
            pos += head + length
        self._flush()

    # --- sending -----------------------------------------------------------------------

    def send(self, text: str) -> None:
        if self.transport is None or self.protocol.state is not State.OPEN:
            return
        self.protocol.send_text(text.encode())
        self._flush()

    def close(self) -> None:
        if self.transport is None:
            return
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self._flush()
        else:
            self.abort()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                transport.close()  # the protocol asked for end of stream
                return

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(
    url: str,
    stats: Stats,
    *,
    senders: int = 0,
    on_frame: OnFrame | None = None,
    source: str | None = None,
    open_timeout: float = 60.0,
) -> Client:
    """Connect and finish the opening handshake; ``source`` is a local address to bind."""
    loop = asyncio.get_running_loop()
    uri = parse_uri(url)
    sock = None
    if source is not None:
        # Distinct source addresses (127.0.0.x) give each one its own ephemeral ports;
        # IP_BIND_ADDRESS_NO_PORT defers the port to connect(), which may then reuse a
        # port towards another destination.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (uri.host, uri.port))
    async with asyncio.timeout(open_timeout):
        if sock is not None:
            _, client = await loop.create_connection(
                lambda: Client(url, stats, senders, on_frame), sock=sock
            )
        else:
            _, client = await loop.create_connection(
                lambda: Client(url, stats, senders, on_frame), uri.host, uri.port
            )
        await client.opened
    return client
