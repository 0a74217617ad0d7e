"""WebSocket connections without a task each: asyncio protocols over websockets' Sans-I/O.

``websockets.asyncio.server.serve`` gives every connection a handler task, its coroutine
stack, a keepalive task and an asyncio connection object with futures, an assembler and
a logger adapter. Measured on this machine that is about 12 KiB per idle connection, most
of what an idle chat server holds. Here each TCP connection is one small
:class:`asyncio.Protocol` around websockets' own Sans-I/O :class:`ServerProtocol` (the
library's extension point for other I/O models: it parses HTTP and frames, answers pings
and closes; nothing of the protocol is written here). An idle connection holds no task,
no coroutine frame and no timer:

- Whole messages are handed to the connection's :class:`Handler` from ``data_received``.
  A handler that has work to finish first says :meth:`Connection.pause_reading`; later
  messages then wait in an inbox, and a long inbox pauses reading from the socket (the
  client's TCP window does the rest), until :meth:`Connection.resume_reading`.
- One sweep for all connections, a few times per second at most, does what per-connection
  tasks and timers did: handshake deadlines, keepalive (a ping to a connection silent for
  ``ping_interval``, close 1011 when nothing came back within ``ping_timeout``), the
  handler's own deadline (:meth:`Connection.close_after`) and the closing handshake's.
- Writes are synchronous: frames go to the socket in one ``transport.write``. A frame
  for many recipients is framed once (:func:`frame_text`, by websockets itself) and the
  same bytes go to each of them (:meth:`Connection.write_framed`): an unmasked server
  frame is the same on every connection without extensions, and this server negotiates
  none.
  :meth:`Connection.buffered` says how much is waiting (the session drops a reader too slow
  to keep up: it knows which bytes are its own paced catch-up), and
  :meth:`Connection.drain` lets a writer that sends a lot at once wait for the socket, so
  it goes at the pace the client reads.

:class:`WebSocketServer` owns the listening socket, the connections, the per-address
count, the sweep and shutdown. The two interfaces between this layer and a session are
:class:`Link` (what a session sees of its connection) and :class:`Handler` (what the
layer calls).
"""

from __future__ import annotations

import asyncio
import errno
import http
import logging
import resource
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, cast

from websockets.extensions import ServerExtensionFactory
from websockets.frames import BINARY, CONT, TEXT, Frame
from websockets.http11 import SERVER as SERVER_HEADER
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN
from websockets.server import ServerProtocol

from chat_server.throttle import LogThrottle

log = logging.getLogger(__name__)

#: Close codes this layer sends itself.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
ABNORMAL_CLOSURE = 1006  # never sent: reported when a connection ends without a close

#: Connections the kernel may hold waiting for accept(). asyncio's default (100) drops
#: SYNs when a few thousand clients reconnect at once (a restart, a network blip); they
#: retry after 1, 3, 7 s, which stretches a reconnect storm to many seconds. Linux caps it
#: at net.core.somaxconn.
LISTEN_BACKLOG = 4096
#: Most fragments one message may arrive in (websockets' own default limit).
MAX_FRAGMENTS = 4096
#: Most bytes of HTTP a client may send before its handshake is answered. Real clients
#: send well under 2 KiB; without a bound a half-open connection could hold up to
#: websockets' own limits (128 header lines of 8 KiB each).
MAX_HANDSHAKE_BYTES = 16 * 1024
#: Bytes handed to the frame parser at a time. While messages wait in the inbox, what
#: was read but not parsed stays bytes: a 256 KiB read of tiny frames would otherwise
#: become tens of thousands of strings at once, whatever the inbox limit.
PARSE_SLICE = 4096
#: File descriptors kept for everything but client connections (the database and its
#: journal, logs, a backup): client connections may use the rest of the process's limit.
FD_RESERVE = 64
#: accept() errors that mean "out of file descriptors or memory, for now".
_ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: Connections still in their handshake dropped, oldest first, when accept() runs out.
EVICT_ON_EXHAUSTION = 64

Message = str | bytes


class Link(Protocol):
    """What a session sees of its connection (implemented by :class:`Connection`)."""

    @property
    def ip(self) -> str:
        """The client's address: the key of per-address limits."""

    @property
    def remote(self) -> str:
        """``ip:port``, for logs."""

    def write(self, frames: Sequence[bytes]) -> None:
        """Send encoded text frames in one socket write; never waits; ignored once closing."""

    def write_framed(self, frames: Sequence[bytes]) -> None:
        """:meth:`write` for frames already framed by :func:`frame_text`."""

    def defer_framed(self, frames: Sequence[bytes]) -> None:
        """:meth:`write_framed`, but the bytes wait here until :meth:`flush` or the next
        write of any kind (which sends them first: nothing overtakes them)."""

    def flush(self) -> None:
        """Send what :meth:`defer_framed` kept."""

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""

    async def drain(self) -> None:
        """Wait until the unsent bytes are below the high-water mark (or it closed)."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (never waits)."""

    def close_after(self, delay: float | None, code: int = ..., reason: str = ...) -> None:
        """Close unless called again with ``None`` within ``delay`` seconds."""

    def pause_reading(self) -> None:
        """Hand over no more messages until :meth:`resume_reading`."""

    def resume_reading(self) -> None: ...

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run work for this connection as a task that shutdown waits for."""


class Handler(Protocol):
    """What the layer calls: one handler (a session) per open WebSocket connection."""

    def received(self, message: Message) -> None:
        """A whole message: text as ``str``, binary as ``bytes``. Never waits."""

    def closed(self, code: int, reason: str) -> None:
        """The WebSocket is no longer open (``code`` 1006: ended without a close frame).

        Called once, soon after it happens but never from inside one of the connection's
        own calls; writes are ignored from then on. A handler cancels its work here.
        """


#: Builds the handler for a connection whose handshake succeeded.
Opener = Callable[["Connection", Request], Handler]
#: Answers a handshake request with an HTTP response instead of a WebSocket (``/healthz``),
#: or returns ``None`` to go on with the handshake; may be a coroutine function. It may
#: set :attr:`Connection.ip` (the client behind a trusted proxy) before returning None.
Responder = Callable[["Connection", Request], Response | Awaitable[Response | None] | None]


_HEAD_SHORT = [bytes((0x81, n)) for n in range(126)]
_HEAD_16 = struct.Struct("!BBH").pack
_HEAD_64 = struct.Struct("!BBQ").pack


def frame_text(data: bytes) -> bytes:
    """``data`` (UTF-8 text) as one final, unmasked text frame: the bytes websockets'
    ``Frame(TEXT, data).serialize(mask=False)`` gives (a 2, 4 or 10 byte header and the
    payload, RFC 6455 5.2; ``tests/test_connections.py`` compares them for every length
    class), without its general path (a ``Frame`` object, its checks), which was the
    largest part of writing a replay in a reconnect storm.

    What a server writes for a text message on a connection without extensions does not
    depend on the connection: the fan-out frames a message once for all its recipients
    (:meth:`Connection.write_framed`) instead of once per recipient.
    """
    size = len(data)
    if size < 126:
        return _HEAD_SHORT[size] + data
    if size < 65536:
        return _HEAD_16(0x81, 126, size) + data
    return _HEAD_64(0x81, 127, size) + data


def text_frames(frames: Sequence[bytes]) -> bytes:
    """:func:`frame_text` of each payload, joined for one socket write."""
    return b"".join([frame_text(data) for data in frames])


def _payload(framed: bytes) -> bytes:
    """The payload of a frame made by :func:`frame_text` (its header is 2, 4 or 10 bytes)."""
    length = framed[1] & 0x7F
    return framed[2 + (2 if length == 126 else 8 if length == 127 else 0) :]


class _Partial:
    """A fragmented message being reassembled."""

    __slots__ = ("count", "data", "text")

    def __init__(self, frame: Frame) -> None:
        self.data = bytearray(frame.data)
        self.text = frame.opcode is TEXT
        self.count = 1


class Connection(asyncio.Protocol):
    """One TCP connection: the handshake, then a WebSocket, fed to websockets' Sans-I/O.

    It is the session's :class:`Link`.
    """

    # Slots: this object is most of what an idle connection costs beyond the library's.
    __slots__ = (
        "_counted",
        "_deadline",
        "_deferred",
        "_drain_waiter",
        "_expire",
        "_gone",
        "_held",
        "_inbox",
        "_ip",
        "_partial",
        "_pinged",
        "_reading_paused",
        "_received",
        "_refused",
        "_seen",
        "_unread",
        "_writing_paused",
        "handler",
        "protocol",
        "remote_address",
        "server",
        "transport",
    )

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.protocol = ServerProtocol(max_size=server.max_size, extensions=server.extensions)
        self.handler: Handler | None = None
        self.transport: asyncio.Transport | None = None
        self.remote_address: tuple[Any, ...] | None = None
        self._ip = "?"
        #: Counted in the server's per-address count (from connection_made on).
        self._counted = False
        #: Refused when it was accepted (over the per-address limit): no handshake.
        self._refused = False
        #: Coarse time (the sweep's clock) data last came in; the handshake's start before.
        self._seen = server.clock
        #: When a keepalive ping was sent and nothing has come in since (0: none).
        self._pinged = 0.0
        #: When the sweep acts on this connection (0: never), and how: close with a code
        #: and reason, or abort the TCP connection (None).
        self._deadline = server.loop.time() + server.handshake_timeout
        self._expire: tuple[int, str] | None = None
        #: Bytes of HTTP received before the handshake was answered.
        self._received = 0
        self._partial: _Partial | None = None
        #: Messages waiting while the handler holds them back (None: none, the usual case).
        self._inbox: deque[Message] | None = None
        #: The handler asked not to be given messages (pause_reading).
        self._held = False
        #: Reading from the socket is paused: the inbox is long.
        self._reading_paused = False
        #: Bytes read but not yet parsed, kept while the inbox is long (None: none).
        self._unread: bytes | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        #: True once the WebSocket left the OPEN state and the handler was told.
        self._gone = False
        #: Frames kept by defer_framed until flush() or the next write (None: none).
        self._deferred: list[bytes] | None = None

    # --- what a handler uses ----------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.protocol.state is OPEN and not self._gone

    @property
    def remote(self) -> str:
        """``host:port`` of the client, for logs; ``client via host:port`` when the
        responder set :attr:`ip` from a trusted proxy's ``X-Forwarded-For``."""
        address = self.remote_address
        if not address:
            return "?"
        peer = f"{address[0]}:{address[1]}"
        return peer if self._ip == str(address[0]) else f"{self._ip} via {peer}"

    @property
    def ip(self) -> str:
        """The client's address (what per-address limits count): the TCP peer's, unless
        the responder said otherwise (a client behind a trusted reverse proxy)."""
        return self._ip

    @ip.setter
    def ip(self, address: str) -> None:
        if self.protocol.state is not CONNECTING:
            raise RuntimeError("the address of an accepted connection cannot change")
        if address != self._ip:
            self.server.moved(self, address)

    def respond(self, status: http.HTTPStatus, text: str) -> Response:
        """A plain-text HTTP response, for a responder to return instead of a handshake."""
        return self.protocol.reject(status, text)

    def buffered(self) -> int:
        """Bytes written (or deferred) but not yet handed to the kernel."""
        transport = self.transport
        size = transport.get_write_buffer_size() if transport is not None else 0
        deferred = self._deferred
        return size if deferred is None else size + sum(map(len, deferred))

    def write(self, frames: Sequence[bytes]) -> None:
        """Send each item (UTF-8 text) as a text frame, all in one socket write.

        Never waits; ignored once the connection is not open. What a client does not read
        piles up here: see :meth:`buffered` and :meth:`drain`.
        """
        protocol = self.protocol
        if protocol.state is not OPEN or self._gone or not frames:
            return
        if protocol.extensions:  # never negotiated by this server; kept correct anyway
            for data in frames:
                protocol.send_text(data)
            self._flush()
            return
        self._flush()  # whatever the protocol has queued (a pong) goes first
        self._send(text_frames(frames))

    def write_framed(self, frames: Sequence[bytes]) -> None:
        """:meth:`write` for frames made by :func:`frame_text`: their bytes go to the
        socket as they are, joined, without framing them again for this connection.

        On a connection with extensions (compression is per connection) websockets frames
        each payload again, as :meth:`write` does.
        """
        data = self._joined(frames)
        if data is not None:
            self._send(data)

    def defer_framed(self, frames: Sequence[bytes]) -> None:
        """:meth:`write_framed`, but the frames wait in this connection until
        :meth:`flush` or its next write of any kind, which sends them first: whatever is
        written after them, from anywhere, reaches the client after them. (A connection
        with extensions has them framed for it and sent at once.)"""
        if self._gone or not frames:
            return
        if self.protocol.extensions:
            self.write_framed(frames)
            return
        deferred = self._deferred
        if deferred is None:
            self._deferred = list(frames)
        else:
            deferred += frames

    def flush(self) -> None:
        """Send what :meth:`defer_framed` kept, now."""
        deferred = self._deferred
        if deferred is not None:
            self._deferred = None
            if self.protocol.state is OPEN and not self._gone:
                self._send(b"".join(deferred))

    def _joined(self, frames: Sequence[bytes]) -> bytes | None:
        """Frames made by :func:`frame_text`, joined for the socket; None when there is
        nothing to send, or when websockets framed and sent them for this connection
        (it has extensions)."""
        protocol = self.protocol
        if protocol.state is not OPEN or self._gone or not frames:
            return None
        if protocol.extensions:
            for framed in frames:
                protocol.send_text(_payload(framed))
            self._flush()
            return None
        return b"".join(frames)

    def _send(self, data: bytes) -> None:
        """Bytes to the socket, after anything deferred: the one place that writes."""
        deferred = self._deferred
        if deferred is not None:
            self._deferred = None
            deferred.append(data)
            data = b"".join(deferred)
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the socket's send buffer is over its high-water mark.

        A writer that sends a lot at once awaits this between parts, so that it goes at
        the pace the client reads and its data never piles up. Returns at once when the
        buffer is low or the connection has closed.
        """
        self.flush()
        if not self._writing_paused or self.transport is None:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self.server.loop.create_future()
        await asyncio.shield(waiter)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the TCP connection is aborted if the client does
        not finish it within ``close_timeout``. Does nothing when already closing."""
        protocol = self.protocol
        if protocol.state is OPEN:
            protocol.send_close(code, reason)
            self._flush()
            self._left_open()
        elif protocol.state is CONNECTING and self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the TCP connection at once (a reset), without a closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        """Hand over no more messages until :meth:`resume_reading`; they wait in order."""
        self._held = True

    def resume_reading(self) -> None:
        """Hand over the messages that waited, soon (not from inside this call)."""
        if self._held:
            self._held = False
            if self._inbox:
                self.server.loop.call_soon(self._feed)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a coroutine for this connection as a task that shutdown waits for."""
        return self.server.spawn(coroutine)

    def close_after(
        self, delay: float | None, code: int = POLICY_VIOLATION, reason: str = ""
    ) -> None:
        """Close with ``code`` unless called again with ``None`` within ``delay`` seconds.

        One deadline per connection (a new call replaces it), checked by the server's
        sweep, so it costs no timer; its precision is the sweep's ``tick``.
        """
        if self.protocol.state is not OPEN or self._gone:
            return
        if delay is None:
            self._deadline, self._expire = 0.0, None
        else:
            self._deadline = self.server.loop.time() + delay
            self._expire = (code, reason)

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        self.remote_address = address = transport.get_extra_info("peername")
        if address:
            self._ip = str(address[0])
        transport.set_write_buffer_limits(server.write_limit)
        server.accepted(self)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        if self._refused:
            return  # its 429 is sent: what it says is of no interest
        if protocol.state is CONNECTING:
            self._received += len(data)
            if self._received > MAX_HANDSHAKE_BYTES and not protocol.eof_sent:
                self._refuse_handshake()
                return
        else:
            self._seen = self.server.clock
            self._pinged = 0.0
        if self._unread is not None:  # reading is paused; a read already under way
            self._unread += data
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Feed bytes to the Sans-I/O protocol and act on what it found, a slice at a
        time; stop, keeping the rest as bytes, once the inbox is long."""
        protocol = self.protocol
        size = len(data)
        start = 0
        while True:
            end = start + PARSE_SLICE
            protocol.receive_data(data if start == 0 and end >= size else data[start:end])
            events = protocol.events_received()
            self._flush()  # pongs, the echo of a close frame, a close after an error
            for event in events:
                if isinstance(event, Frame):
                    if protocol.state is not OPEN or self._gone:
                        break  # closing: what comes after a close is ignored
                    self._frame(event)
                else:
                    self._handshake(cast(Request, event))
            start = end
            if start >= size:
                break
            if self._reading_paused:
                self._unread = data[start:]
                break
        if protocol.state is not OPEN and protocol.state is not CONNECTING:
            self._left_open()
            if protocol.close_rcvd is not None and protocol.close_sent is not None:
                # Both close frames are through: nothing more can come that matters, and
                # the server closes the TCP connection first (RFC 6455, 7.1.1).
                assert self.transport is not None
                self.transport.close()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._flush()
        self._left_open()
        # Returning None lets the transport close: WebSocket never writes after EOF.

    def connection_lost(self, exc: Exception | None) -> None:
        self._deferred = None
        self.protocol.receive_eof()  # idempotent; the state is now CLOSED
        self._left_open()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.server.removed(self)
        self._counted = False

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the handshake ----------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        responder = self.server.responder
        try:
            response = responder(self, request) if responder is not None else None
        except Exception:
            log.exception("answering a handshake from %s failed", self.remote)
            response = self._internal_error()
        if isinstance(response, Awaitable):
            # Only for plain HTTP requests such as /healthz: not on the WebSocket path.
            assert self.transport is not None
            self.transport.pause_reading()
            self.server.spawn(self._respond_later(request, response))
        else:
            self._respond(request, response)

    async def _respond_later(self, request: Request, pending: Awaitable[Response | None]) -> None:
        try:
            response = await pending
        except Exception:
            log.exception("answering a handshake from %s failed", self.remote)
            response = self._internal_error()
        if self.protocol.state is CONNECTING and self.transport is not None:
            if not self.transport.is_closing():
                self.transport.resume_reading()
            self._respond(request, response)

    def _respond(self, request: Request, response: Response | None) -> None:
        protocol = self.protocol
        server = self.server
        if response is None:
            limit = server.max_connections_per_address
            ip = self.ip
            # Counted since it was accepted; over only if the responder gave it another
            # address (a client behind a proxy) that has its share already.
            if limit and server.per_address.get(ip, 0) > limit:
                response = server.refusal(self)
            elif not server.serving:
                response = protocol.reject(
                    http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n"
                )
            else:
                response = protocol.accept(request)
                response.headers.update(server.accept_headers)
        response.headers["Server"] = SERVER_HEADER
        protocol.send_response(response)
        self._flush()
        if protocol.state is not OPEN:
            # Refused: the response was followed by EOF; the client closes its side.
            self._deadline = server.loop.time() + server.close_timeout
            self._expire = None
            return
        self._deadline, self._expire = 0.0, None
        self._seen = server.clock
        server.waiting.pop(self, None)
        try:
            self.handler = server.opener(self, request)
        except Exception:
            log.exception("opening a session for %s failed", self.remote)
            self.close(INTERNAL_ERROR, "internal error")
        # websockets' parser generator keeps the request as a local for the connection's
        # life: its headers (about 2 KiB) are freed here, once the opener has read them.
        request.headers.clear()

    def _internal_error(self) -> Response:
        return self.protocol.reject(
            http.HTTPStatus.INTERNAL_SERVER_ERROR, "failed to answer; see the server log\n"
        )

    def refuse_at_once(self) -> None:
        """Over the per-address limit from the moment it was accepted: answer 429 before
        any request arrives and discard whatever does; the client closes its side (or
        the sweep drops it after ``close_timeout``)."""
        self._refused = True
        protocol = self.protocol
        protocol.send_response(self.server.refusal(self))
        self._flush()
        self._deadline = self.server.loop.time() + self.server.close_timeout
        self._expire = None

    def _refuse_handshake(self) -> None:
        protocol = self.protocol
        response = protocol.reject(
            http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"handshake over {MAX_HANDSHAKE_BYTES} bytes\n",
        )
        response.headers["Server"] = SERVER_HEADER
        protocol.send_response(response)
        self._flush()
        self._deadline = self.server.loop.time() + self.server.close_timeout
        self._expire = None

    # --- messages in --------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is TEXT or opcode is BINARY:
            if not frame.fin:
                self._partial = _Partial(frame)
                return
            data: bytes | bytearray | memoryview = frame.data
            text = opcode is TEXT
        elif opcode is CONT:
            partial = self._partial
            if partial is None:  # the Sans-I/O parser refuses this before it gets here
                return
            partial.data += frame.data
            partial.count += 1
            if partial.count > MAX_FRAGMENTS:
                self._fail(MESSAGE_TOO_BIG, "too many fragments")
                return
            if not frame.fin:
                return
            self._partial = None
            data, text = partial.data, partial.text
        else:
            return  # ping, pong and close are answered by the Sans-I/O protocol
        if text:
            try:
                message: Message = str(data, "utf-8")
            except UnicodeDecodeError as exc:
                self._fail(INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        else:
            message = bytes(data)
        self._deliver(message)

    def _deliver(self, message: Message) -> None:
        inbox = self._inbox
        if self._held or inbox:
            if inbox is None:
                inbox = self._inbox = deque()
            inbox.append(message)
            if len(inbox) >= self.server.inbox_limit and not self._reading_paused:
                self._reading_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
            return
        self._call(message)

    def _feed(self) -> None:
        """Hand over waiting messages, then bytes not parsed yet, while the handler
        takes them; read from the socket again once little is waiting."""
        while not self._gone and not self._held:
            inbox = self._inbox
            if inbox:
                self._call(inbox.popleft())
                continue
            self._inbox = None
            unread, self._unread = self._unread, None
            if unread is None:
                break
            self._parse(unread)
        if self._gone and self._unread is not None:
            # It may hold the client's close frame: parse it, handing nothing over.
            unread, self._unread = self._unread, None
            self._parse(unread)
        self._resume_when_short()

    def _resume_when_short(self) -> None:
        if (
            self._reading_paused
            and self._unread is None
            and len(self._inbox or ()) <= self.server.inbox_limit // 4
        ):
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _call(self, message: Message) -> None:
        handler = self.handler
        if handler is None or self._gone:
            return
        try:
            handler.received(message)
        except Exception:
            # A bug in one request must not take the connection or the server with it
            # (nor, repeated by a client, flood the log).
            self.server.throttle.log(
                logging.ERROR,
                "handler-failed",
                "handling a message from %s failed",
                self.remote,
                exc_info=True,
            )

    # --- messages out and closing -------------------------------------------------------

    def _flush(self) -> None:
        """Hand what the Sans-I/O protocol wants sent to the socket, in one write."""
        chunks = self.protocol.data_to_send()
        transport = self.transport
        if not chunks or transport is None or transport.is_closing():
            return
        eof = not chunks[-1]
        # Nothing else waits in the Sans-I/O protocol: every call that queues data there
        # comes here before it returns. What was deferred goes first.
        self._send(b"".join(chunks))
        if eof:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def _fail(self, code: int, reason: str) -> None:
        self.protocol.fail(code, reason)
        self._flush()
        self._left_open()

    def _left_open(self) -> None:
        """The WebSocket left the OPEN state: stop the handler's work and tell it, once."""
        if self._gone or self.protocol.state is OPEN:
            return
        was_open = self.handler is not None
        self._gone = True
        self._partial = None
        self._inbox = None
        if self._unread is not None:
            self.server.loop.call_soon(self._feed)  # then read the rest of the socket
        else:
            self._resume_when_short()  # to read the client's side of the closing handshake
        if self.protocol.close_expected():
            # Wait for the client's side of the closing handshake, but not for ever.
            self._deadline = self.server.loop.time() + self.server.close_timeout
            self._expire = None
        if was_open:
            code, reason = self._close_status()
            self.server.loop.call_soon(self._tell_closed, code, reason)

    def _tell_closed(self, code: int, reason: str) -> None:
        handler = self.handler
        self.handler = None
        if handler is not None:
            try:
                handler.closed(code, reason)
            except Exception:
                log.exception("closing the session of %s failed", self.remote)

    def _close_status(self) -> tuple[int, str]:
        """The close that ended the connection: ours if we sent one first, else theirs."""
        protocol = self.protocol
        sent, rcvd = protocol.close_sent, protocol.close_rcvd
        if sent is not None and protocol.close_rcvd_then_sent is not True:
            return sent.code, sent.reason
        if rcvd is not None:
            return rcvd.code, rcvd.reason
        return ABNORMAL_CLOSURE, ""

    def _expired(self, now: float) -> None:
        """The deadline passed: close as the handler asked, or drop the TCP connection."""
        self._deadline = 0.0
        expire, self._expire = self._expire, None
        if expire is not None and self.protocol.state is OPEN:
            self.close(*expire)
        elif self.transport is not None:
            self.transport.abort()

    def _keepalive(self, now: float) -> None:
        """Ping a silent connection; fail it with 1011 when the ping went unanswered."""
        server = self.server
        if self._pinged:
            if server.ping_timeout and now - self._pinged >= server.ping_timeout:
                self._fail(INTERNAL_ERROR, "keepalive ping timeout")
                # Nothing came back for a whole timeout: do not wait for a closing
                # handshake too, close (and abort, if even that cannot flush in time).
                if self.transport is not None:
                    self.transport.close()
        elif now - self._seen >= server.ping_interval:
            self.protocol.send_ping(b"")
            self._flush()
            self._pinged = now


def connection_budget() -> int:
    """How many connections the open-file limit leaves room for (0: no limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(16, soft - FD_RESERVE)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit (each connection holds one;
    the usual soft default, 1024, is far below what the server can serve). Returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.info("open-file limit raised from %d to %d", soft, hard)
    return hard


class WebSocketServer:
    """The listening socket, every connection, the per-address count, the sweep, shutdown.

    ``opener`` builds a connection's handler once its handshake succeeds; ``responder``
    may answer a handshake request with plain HTTP instead (``process_request`` in
    websockets' terms); ``accept_headers`` go on every accepted handshake's response.
    Connections are counted per address from the moment they are accepted, whatever
    their state: a TCP connection from an address that already has
    ``max_connections_per_address`` (0: no limit) is answered 429 at once, before it sends
    anything, and beyond twice that it is reset. The address is :attr:`Connection.ip`
    (which the responder may change during the handshake). ``max_connections`` (by
    default what the open-file limit leaves) bounds all connections: beyond it, the
    oldest one still in its handshake is dropped to make room.
    """

    def __init__(
        self,
        opener: Opener,
        *,
        responder: Responder | None = None,
        accept_headers: Mapping[str, str] | None = None,
        max_size: int = 2**20,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        close_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        max_connections_per_address: int = 0,
        proxy: Callable[[str], bool] | None = None,
        max_connections: int | None = None,
        write_limit: int = 32 * 1024,
        inbox_limit: int = 16,
        tick: float = 1.0,
        extensions: Sequence[ServerExtensionFactory] | None = None,
    ) -> None:
        self.opener = opener
        self.responder = responder
        self.accept_headers = dict(accept_headers or {})
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections_per_address = max_connections_per_address
        #: Whether a peer address is a trusted reverse proxy: its connections are counted
        #: but never refused at accept, since whose they are is known only from the request.
        self.proxy = proxy
        #: Most TCP connections at once (0: no limit; None: what the open-file limit
        #: leaves after FD_RESERVE).
        self.max_connections = connection_budget() if max_connections is None else max_connections
        self.write_limit = write_limit
        self.inbox_limit = inbox_limit
        self.tick = tick
        #: WebSocket extensions offered to clients (websockets' factories). The chat
        #: server offers none: its fan-out sends the same framed bytes to every recipient.
        self.extensions = extensions
        self.loop = asyncio.get_running_loop()
        #: The sweep's clock: loop.time() at the last sweep, read instead of the clock.
        self.clock = self.loop.time()
        self.connections: set[Connection] = set()
        #: TCP connections per client address (Connection.ip), counted from accept on:
        #: a socket that never sends a handshake counts as much as an open WebSocket.
        self.per_address: dict[str, int] = {}
        #: Connections without an open WebSocket yet (in their handshake, or refused),
        #: oldest first: the ones dropped to make room when file descriptors run short.
        self.waiting: dict[Connection, None] = {}
        #: Refusals and resource errors are logged once per interval, not once each.
        self.throttle = LogThrottle(log)
        #: Running tasks: a session's current request, a handshake answered later.
        self.tasks: set[asyncio.Task[None]] = set()
        self.serving = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: Set during shutdown when the last connection is gone.
        self._emptied: asyncio.Event | None = None
        self._previous_handler: Any = None

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def listen(
        self, host: str | None, port: int, *, backlog: int = LISTEN_BACKLOG, **kwargs: Any
    ) -> None:
        self._watch_accept_errors()
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, backlog=backlog, **kwargs
        )
        self.serving = True
        self._sweeper = self.loop.create_task(self._sweep_forever(), name="ws-sweep")

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a coroutine that belongs to a connection; shutdown waits for it."""
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a connection's task failed", exc_info=exc)

    # --- bookkeeping, called by connections -------------------------------------------

    def accepted(self, connection: Connection) -> None:
        """A TCP connection was accepted: count it against its address at once, and
        refuse it at once when that is over the limit. When the connections would use
        up the file descriptors, drop the oldest one still in its handshake instead."""
        self.connections.add(connection)
        self.waiting[connection] = None
        ip = connection.ip
        count = self.per_address[ip] = self.per_address.get(ip, 0) + 1
        connection._counted = True
        limit = self.max_connections_per_address
        if limit and count > limit and not (self.proxy is not None and self.proxy(ip)):
            if count > 2 * limit:
                # Its refusals are still being read: drop this one without a word (a
                # reset), so that one address holds at most twice its limit.
                self.throttle.warning(
                    "dropped", "reset connections from %s: %d open from it", ip, count - 1
                )
                connection.abort()
            else:
                connection.refuse_at_once()
            return
        cap = self.max_connections
        if cap and len(self.connections) > cap:
            self._make_room(1, exclude=connection)

    def _make_room(self, count: int, exclude: Connection | None = None) -> int:
        """Drop up to ``count`` of the oldest connections without an open WebSocket
        (refused, or silent in their handshake); the newest if there is none other."""
        victims: list[Connection] = []
        for connection in self.waiting:
            if len(victims) >= count:
                break
            if connection is not exclude:
                victims.append(connection)
        if not victims and exclude is not None:
            victims.append(exclude)
        self.throttle.warning(
            "full",
            "%d connections open (limit %d, from the open-file limit): dropped %d still "
            "in their handshake",
            len(self.connections),
            self.max_connections,
            len(victims),
        )
        for connection in victims:
            self.waiting.pop(connection, None)
            connection.abort()
        return len(victims)

    def refusal(self, connection: Connection) -> Response:
        """The 429 for a connection over its address's limit (logged once a while)."""
        ip, limit = connection.ip, self.max_connections_per_address
        self.throttle.warning(
            "refused", "refused connections from %s: already %d open from it", ip, limit
        )
        text = f"too many connections from {ip} (limit {limit})\n"
        response = connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, text)
        response.headers["Server"] = SERVER_HEADER
        return response

    def moved(self, connection: Connection, ip: str) -> None:
        """The responder says the client is at ``ip`` (behind a trusted proxy)."""
        if connection._counted:
            self._uncount(connection)
            self.per_address[ip] = self.per_address.get(ip, 0) + 1
        connection._ip = ip

    def _uncount(self, connection: Connection) -> None:
        ip = connection.ip
        count = self.per_address.get(ip, 0) - 1
        if count > 0:
            self.per_address[ip] = count
        else:
            self.per_address.pop(ip, None)

    def _watch_accept_errors(self) -> None:
        """Out of file descriptors, the event loop reports each failed accept(): log it
        once a while instead, and drop connections still in their handshake to make
        room, so that /healthz and real clients get in again at once."""
        self._previous_handler = previous = self.loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in _ACCEPT_RESOURCE_ERRORS:
                self.throttle.log(
                    logging.ERROR,
                    "accept",
                    "cannot accept connections: %s (%d open; %s); dropping the oldest "
                    "ones still in their handshake",
                    exc.strerror or exc,
                    len(self.connections),
                    context.get("message", ""),
                )
                self._make_room(EVICT_ON_EXHAUSTION)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        self.loop.set_exception_handler(handler)

    def removed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.waiting.pop(connection, None)
        if connection._counted:
            self._uncount(connection)
        if not self.connections and self._emptied is not None:
            self._emptied.set()

    # --- the sweep ----------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.sweep()
            except Exception:  # the sweep must outlive any one connection's trouble
                log.exception("connection sweep failed")

    def sweep(self) -> None:
        """Deadlines and keepalive for every connection, in one pass.

        An idle connection costs two attribute reads here: the pass runs every ``tick``
        over all of them (about 20 ms for 19,000 on the development machine).
        """
        now = self.clock = self.loop.time()
        interval = self.ping_interval
        expired: list[Connection] = []
        silent: list[Connection] = []
        for connection in self.connections:
            deadline = connection._deadline
            if deadline and now >= deadline:
                expired.append(connection)
            elif interval and (connection._pinged or now - connection._seen >= interval):
                silent.append(connection)
        # Acting may close connections: not while iterating over them.
        for connection in expired:
            connection._expired(now)
        for connection in silent:
            if (
                connection.handler is not None
                and not connection._gone
                and not connection._reading_paused  # its pongs wait behind its messages
            ):
                connection._keepalive(now)

    # --- shutdown -------------------------------------------------------------------------

    async def shutdown(
        self, code: int = GOING_AWAY, reason: str = "server shutting down", grace: float = 1.0
    ) -> None:
        """Stop accepting; abort connections still in their handshake; close the open ones
        with ``code``; abort those that did not finish closing ``grace`` seconds after the
        start (and any not yet sent a close by then: closing costs a socket write each);
        then wait for the connections' tasks. Returns within about ``grace`` + 0.75 s."""
        started = self.loop.time()
        deadline = started + grace
        self.serving = False
        if self._server is not None:
            self._server.close()
        self._emptied = emptied = asyncio.Event()
        opened: list[Connection] = []
        handshakes = 0
        for connection in list(self.connections):
            if connection.handler is not None:
                opened.append(connection)
            elif connection.protocol.state is CONNECTING and connection.transport is not None:
                connection.transport.abort()
                handshakes += 1
        sent = 0
        for connection in opened:
            connection.close(code, reason)
            sent += 1
            if sent % 256 == 0:
                await asyncio.sleep(0)  # let replies in, and connection_lost run
                if self.loop.time() >= deadline:
                    break
        if not self.connections:
            emptied.set()
        await self._until(emptied, deadline - self.loop.time())
        stragglers = list(self.connections)
        for connection in stragglers:
            if connection.transport is not None:
                connection.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._until(emptied, 0.25)  # aborted transports call connection_lost soon
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=0.5)
            for task in pending:
                log.error("a connection's task did not stop on cancellation: %r", task)
        if self._sweeper is not None:
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        self.loop.set_exception_handler(self._previous_handler)
        log.info(
            "connections closed in %.2f s: %d of %d open ones sent %d, %d aborted "
            "(no answer in time or not reached), %d aborted in their handshake",
            self.loop.time() - started,
            sent,
            len(opened),
            code,
            len(stragglers),
            handshakes,
        )
        if self.connections:
            log.warning("%d connections still open after shutdown", len(self.connections))

    @staticmethod
    async def _until(event: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass

    @property
    def open_count(self) -> int:
        return sum(1 for c in self.connections if c.protocol.state is OPEN)

    def states(self) -> dict[str, int]:
        """How many connections are in each state (for tests and logs)."""
        counts: dict[str, int] = {}
        for connection in self.connections:
            name = connection.protocol.state.name
            counts[name] = counts.get(name, 0) + 1
        return counts


__all__ = [
    "Connection",
    "Handler",
    "Link",
    "Message",
    "Opener",
    "Responder",
    "WebSocketServer",
    "connection_budget",
    "frame_text",
    "raise_open_file_limit",
]
