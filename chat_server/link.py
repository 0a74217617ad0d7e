"""How a session reaches its client: the :class:`Link` interface, and its implementation
over a websockets asyncio ``ServerConnection`` with the read loop that drives a session.

The session (``session.py``) decides what to answer and in which order; it never reads a
socket. It is fed whole text or binary messages through ``Session.received`` and writes
encoded frames through its link. Another transport (an ``asyncio.Protocol`` over
websockets' Sans-I/O ``ServerProtocol``, say) only has to implement :class:`Link` and
call ``opened``, ``received`` and ``closed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

if TYPE_CHECKING:
    from chat_server.session import Session

log = logging.getLogger(__name__)


class Link(Protocol):
    """The only I/O a session does."""

    #: The client's IP address (the key of per-address limits) and ``ip:port``, for logs.
    ip: str
    remote: str

    def write(self, frames: Sequence[bytes]) -> None:
        """Queue encoded text frames and hand them to the socket in one write; never waits.

        Does nothing once the connection is closing.
        """

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""

    async def drain(self) -> None:
        """Wait until the unsent bytes are below the transport's low-water mark."""

    def close(self, code: int, reason: str) -> None:
        """Start a closing handshake in the background."""

    def pause_reading(self) -> None:
        """Stop feeding the session frames until ``resume_reading``."""

    def resume_reading(self) -> None: ...


class WebSocketLink:
    """A :class:`Link` over a websockets asyncio connection."""

    __slots__ = ("_reading", "close_request", "closing", "connection", "ip", "remote")

    def __init__(self, connection: ServerConnection, closing: set[asyncio.Task[None]]) -> None:
        self.connection = connection
        address = connection.remote_address
        self.ip = str(address[0]) if address else "?"
        self.remote = f"{address[0]}:{address[1]}" if address else "?"
        #: Background close tasks, awaited (or cut short) by the server's shutdown.
        self.closing = closing
        self.close_request: tuple[int, str] | None = None
        self._reading: asyncio.Event | None = None

    def write(self, frames: Sequence[bytes]) -> None:
        write_frames(self.connection, frames)

    def buffered(self) -> int:
        transport = self.connection.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def drain(self) -> None:
        if self.connection.protocol.state is State.OPEN:
            await self.connection.drain()

    def close(self, code: int, reason: str) -> None:
        if self.close_request is None:
            self.close_request = (code, reason)
        task = asyncio.create_task(self.connection.close(code, reason))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    def pause_reading(self) -> None:
        if self._reading is None:
            self._reading = asyncio.Event()
        self._reading.clear()

    def resume_reading(self) -> None:
        if self._reading is not None:
            self._reading.set()

    async def serve(self, session: Session) -> None:
        """Feed the session every message until the connection closes."""
        request = self.connection.request
        agent = request.headers.get("User-Agent", "?") if request is not None else "?"
        log.info("connection from %s (%s)", self.remote, agent)
        # The handshake's HTTP headers are not used after this point; holding them costs
        # about 2 KiB per connection for as long as it stays open.
        for handshake in (request, self.connection.response):
            if handshake is not None:
                handshake.headers.clear()
        session.opened()
        try:
            async for data in self.connection:
                session.received(data)
                if self._reading is not None and not self._reading.is_set():
                    await self._resumed_or_closed(self._reading)
        except ConnectionClosed:
            pass
        finally:
            session.closed()
            if self.close_request is not None:
                # Close here too: returning first would let websockets close with 1000.
                await self.connection.close(*self.close_request)
            session.log_close(self.connection.close_code, self.connection.close_reason)

    async def _resumed_or_closed(self, reading: asyncio.Event) -> None:
        """Wait until the session wants frames again, or the connection is gone."""
        waits = {
            asyncio.ensure_future(reading.wait()),
            asyncio.ensure_future(self.connection.wait_closed()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


def write_frames(connection: ServerConnection, frames: Sequence[bytes]) -> None:
    """Queue text frames on a connection and hand them to the socket in one write.

    What ``websockets.broadcast`` does for one frame, for several: each message is framed
    by the connection's Sans-I/O ``protocol``, then all the bytes go to the transport
    together (``Connection.send_data`` would write each frame separately: one system
    call per frame). Like broadcast, it skips a connection that is not open and never
    waits. (Broadcast also skips a connection in the middle of a fragmented send; this
    server never sends fragmented messages.)
    """
    if connection.protocol.state is not State.OPEN:
        return
    try:
        for data in frames:
            connection.protocol.send_text(data)
        chunks = connection.protocol.data_to_send()
        connection.transport.write(b"".join(chunks))
        if chunks and not chunks[-1] and connection.transport.can_write_eof():
            connection.transport.write_eof()  # the protocol asked to half-close
    except Exception:  # a broken connection: its handler will see the close
        log.debug("write to %s failed", connection.remote_address, exc_info=True)
