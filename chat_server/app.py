"""The server: wires the store, the hub, presence, quotas and sessions to a websockets server.

Shape after the websockets examples: one handler per connection, ``/healthz`` answered in
``process_request`` on the same port. Shutdown closes the listening socket, drops
connections that never finished their handshake, closes every client with 1001, waits
at most ``shutdown_timeout`` for the closing handshakes and then drops what is left, and
lets the writer commit what is queued before the database is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from chat_protocol.limits import MAX_BODY_CHARS, MAX_FRAME_BYTES, MAX_ROOMS, MEMBERS_MAX
from chat_server import metrics
from chat_server.backends import open_store, redacted
from chat_server.backends.base import ChatStore, StoreFailed, StoreUnavailable
from chat_server.backends.postgres import PostgresStore
from chat_server.cluster import Cluster
from chat_server.config import ServerConfig
from chat_server.fanout import Delivery, Hub
from chat_server.forwarded import TrustedProxies
from chat_server.link import WebSocketLink
from chat_server.messages import Committed, Draft
from chat_server.presence import Presence
from chat_server.ratelimit import Limit, Quotas, Rule
from chat_server.session import Context, Session, Slot
from chat_server.shared_limits import SharedQuotas

log = logging.getLogger(__name__)

#: How long /healthz waits for its probe write before it answers 503.
HEALTH_TIMEOUT = 3.0
#: How long a successful /healthz probe is reused: a flood of checks costs one write a
#: second. A failure is not reused: the next check probes again (a failed probe commits
#: nothing), so recovery shows at once.
HEALTH_CACHE = 1.0


class ChatServer:
    """The running server; also the store's commit listener."""

    def __init__(self, config: ServerConfig, store: ChatStore) -> None:
        self.config = config
        self.store = store
        self.hub = Hub(config.send_buffer_limit)
        presence = Presence(self.hub)
        #: Set when the store is shared by several replicas (PostgreSQL).
        self.cluster: Cluster | None = None
        self.quotas = Quotas(_rules(config), max_connections=config.max_connections_per_ip)
        if isinstance(store, PostgresStore):
            self.cluster = Cluster(store, self.hub, presence, timeout=config.replica_timeout)
            self.quotas = SharedQuotas(
                _rules(config),
                store,
                self.cluster.replica,
                max_connections=config.max_connections_per_ip,
            )
        self.ctx = Context(
            config,
            store,
            self.hub,
            presence,
            self.quotas,
            _announced_limits(config),
            cluster=self.cluster,
        )
        #: Behind a reverse proxy: the client's address, from X-Forwarded-For.
        self.proxies = TrustedProxies(config.trusted_proxies)
        self.server: Server | None = None
        self._stopped = asyncio.Event()
        #: Every TCP connection, handshake done or not, so a shutdown can drop them.
        self.connections: set[ServerConnection] = set()
        #: Background closes started by sessions (kicks).
        self.closing: set[asyncio.Task[None]] = set()
        self._healthy_at: float | None = None  # when a probe last committed
        self._health_probe: asyncio.Task[str | None] | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        sockets = list(self.server.sockets)
        return int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Begin a graceful shutdown (signal handlers call this); safe to call twice."""
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- websockets hooks ------------------------------------------------------------

    async def handler(self, connection: ServerConnection) -> None:
        link = WebSocketLink(connection, self.closing)
        client = connection.client_ip if isinstance(connection, TrackedConnection) else None
        if client is not None and client != link.ip:  # behind a trusted proxy
            link.remote = f"{client} via {link.remote}"
            link.ip = client
        metrics.CONNECTIONS.inc()
        try:
            await link.serve(Session(self.ctx, link))
        finally:
            metrics.CONNECTIONS.dec()

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        forwarded = request.headers.get_all("X-Forwarded-For")
        ip = await self.proxies.client_ip(_ip(connection), forwarded)
        wait = await self.quotas.take(Limit.ADDRESS_HTTP, ip)
        if wait:
            response = connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS, f"too many requests from {ip}; slow down\n"
            )
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        if request.path == "/metrics":
            data, content_type = metrics.exposition()
            response = connection.respond(HTTPStatus.OK, "")
            for name, value in (("Content-Type", content_type), ("Content-Length", len(data))):
                del response.headers[name]  # Headers is a multidict: replace, not add
                response.headers[name] = str(value)
            response.body = data
            return response
        if request.path == "/healthz":
            error = await self.health()
            if error is not None:
                text = f"database not writable: {error}\n"
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, text)
            return connection.respond(HTTPStatus.OK, "OK\n")
        if not self.quotas.open(ip):
            limit = self.config.max_connections_per_ip
            log.warning("refused %s: already %d connections from it", ip, limit)
            text = f"too many connections from {ip} (limit {limit})\n"
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, text)
        if isinstance(connection, TrackedConnection):
            connection.counted_ip = connection.client_ip = ip
        return None

    def connection_lost(self, connection: TrackedConnection) -> None:
        self.connections.discard(connection)
        if connection.counted_ip is not None:
            self.quotas.close(connection.counted_ip)
            connection.counted_ip = None

    async def health(self) -> str | None:
        """None while the database commits a probe write, else why not.

        A success is reused for ``HEALTH_CACHE`` seconds, unless a write has failed since;
        checks that arrive together share one probe.
        """
        healthy_at = self._healthy_at
        now = asyncio.get_running_loop().time()
        fresh = healthy_at is not None and now - healthy_at < HEALTH_CACHE
        if fresh and self.store.writable and self._stream_healthy():
            return None
        if self._health_probe is None:
            self._health_probe = asyncio.create_task(self._probe())
        return await asyncio.shield(self._health_probe)

    def _stream_healthy(self) -> bool:
        """In a cluster, whether this replica hears the other replicas' commits."""
        return self.cluster is None or self.cluster.healthy

    async def _probe(self) -> str | None:
        error: str | None = None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.store.probe()
        except (StoreUnavailable, StoreFailed, TimeoutError) as exc:
            error = self.store.last_error or str(exc) or type(exc).__name__
        if error is None and not self._stream_healthy():
            error = "the live message stream between replicas (LISTEN) is not connected"
        self._healthy_at = asyncio.get_running_loop().time() if error is None else None
        self._health_probe = None
        return error

    # --- CommitListener ----------------------------------------------------------------

    def committed(self, results: Sequence[Committed]) -> None:
        """Fan a committed batch out in id order, then each sender's answers in order."""
        hub = self.hub
        deliveries: list[Delivery] = []
        delivered = fresh = acks = 0
        # In a cluster every replica delivers messages from the ordered stream
        # (chat_server.cluster), its own commits included; here only the answers.
        if self.cluster is None:
            deliveries, delivered = hub.deliveries(
                [r.message for r in results if r.fresh], self.ctx.presence.before_messages
            )
        answered: dict[Session, None] = {}
        for result in results:
            fresh += result.fresh
            slot = result.draft.origin
            if isinstance(slot, Slot):
                slot.owner.acked(slot, result.message)
                answered[slot.owner] = None
                acks += 1
        for session in answered:
            deliveries.extend(([session], data, None) for data in session.ready())
        hub.publish_many(deliveries)
        metrics.MESSAGES.inc(fresh)
        metrics.ACKS.inc(acks)
        metrics.DELIVERIES.inc(delivered)
        metrics.BATCH_SIZE.observe(len(results))

    def failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        for draft in drafts:
            slot = draft.origin
            if isinstance(slot, Slot):
                slot.owner.refused(slot, error)

    # --- shutdown ------------------------------------------------------------------------

    async def shut_down(self, server: Server) -> None:
        """Close every connection with 1001 within ``shutdown_timeout``, dropping the rest."""
        server.close()
        for connection in list(self.connections):
            if connection.protocol.state is State.CONNECTING:  # no handshake: nothing to say
                connection.transport.abort()
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await server.wait_closed()
                if self.closing:
                    await asyncio.gather(*self.closing, return_exceptions=True)
        except TimeoutError:
            log.warning(
                "dropping %d connections still closing after %.1f s",
                len(self.connections),
                self.config.shutdown_timeout,
            )
            for connection in list(self.connections):
                connection.transport.abort()
            for task in self.closing:
                task.cancel()
            try:
                async with asyncio.timeout(0.5):
                    await server.wait_closed()
            except TimeoutError:  # a handler that ignores its closed socket: a bug, not a hang
                log.error("cancelling %d connection handlers", len(server.handler_tasks))
                for task in server.handler_tasks:
                    task.cancel()
                await server.wait_closed()


class TrackedConnection(ServerConnection):
    """A connection that tells its server when it is made and when it is lost."""

    chat: ChatServer  # set on a subclass per server, see _tracked()
    #: The address whose connection limit counts this connection, once it is counted.
    counted_ip: str | None = None
    #: The client's address (behind a trusted proxy: from X-Forwarded-For).
    client_ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.chat.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.chat.connection_lost(self)
        super().connection_lost(exc)


def _tracked(chat: ChatServer) -> type[TrackedConnection]:
    return type("TrackedConnection", (TrackedConnection,), {"chat": chat})


def _ip(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else "?"


def _rules(config: ServerConfig) -> dict[Limit, Rule]:
    hour = 3600.0
    return {
        Limit.NICK_MESSAGES: Rule(config.rate, config.burst),
        Limit.ADDRESS_MESSAGES: Rule(config.address_rate, config.address_burst),
        Limit.ADDRESS_CATCHUP: Rule(config.catchup_rate, config.catchup_burst),
        Limit.ADDRESS_ROOMS: Rule(config.rooms_per_hour / hour, config.rooms_per_hour),
        Limit.ADDRESS_NICKS: Rule(config.nicks_per_hour / hour, config.nicks_per_hour),
        Limit.ADDRESS_HTTP: Rule(config.http_rate, config.http_burst),
    }


def _announced_limits(config: ServerConfig) -> dict[str, Any]:
    return {
        "max_frame_bytes": MAX_FRAME_BYTES,
        "max_body_chars": MAX_BODY_CHARS,
        "max_rooms": MAX_ROOMS,
        "members_max": MEMBERS_MAX,
        "rate": config.rate,
        "burst": config.burst,
        "address_rate": config.address_rate,
        "address_burst": config.address_burst,
        "catchup_rate": config.catchup_rate,
        "catchup_burst": config.catchup_burst,
        "rooms_per_hour": config.rooms_per_hour,
        "nicks_per_hour": config.nicks_per_hour,
        "nick_claim_ttl": config.nick_claim_ttl,
        "history_bytes": config.history_bytes,
        "catchup_bytes": config.catchup_bytes,
        "resume_cap": config.resume_cap,
        "resume_bytes": config.resume_bytes,
        "send_buffer_limit": config.send_buffer_limit,
        "ping_interval": config.ping_interval,
        "ping_timeout": config.ping_timeout,
    }


@asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[ChatServer]:
    """Open the database and serve; on exit shut down gracefully in the documented order."""
    store = await open_store(config)
    chat = ChatServer(config, store)
    store.start(chat)
    try:
        if chat.cluster is not None:
            await chat.cluster.start()
        if isinstance(chat.quotas, SharedQuotas):
            chat.quotas.start()
        server = await serve(
            chat.handler,
            config.host,
            config.port,
            process_request=chat.process_request,
            max_size=MAX_FRAME_BYTES,
            compression=None,
            ping_interval=config.ping_interval or None,
            ping_timeout=config.ping_timeout or None,
            close_timeout=config.close_timeout,
            open_timeout=config.handshake_timeout,
            create_connection=_tracked(chat),
        )
        chat.server = server
        log.info(
            "listening on %s:%d, database %s (last id %d, epoch %s)",
            config.host,
            chat.port,
            redacted(str(config.db)),
            store.last_id,
            store.epoch,
        )
        try:
            yield chat
        finally:
            log.info("shutting down: closing connections with 1001")
            await chat.shut_down(server)
    finally:
        if isinstance(chat.quotas, SharedQuotas):
            await chat.quotas.stop()
        if chat.cluster is not None:
            await chat.cluster.stop()
        await store.close()
        log.info(
            "database closed; last id %d; %d messages in %d group commits",
            store.last_id,
            store.batched,
            store.batches,
        )
