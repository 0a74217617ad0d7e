"""The server: wires the store, the hub and sessions to a websockets server.

Shape after the websockets examples: one handler per connection, ``/healthz`` answered in
``process_request`` on the same port, and a shutdown that closes the listening socket,
closes every client with 1001, waits for the handlers, then lets the writer commit what
is queued before the database is closed.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from chat_protocol import ErrorCode, encode
from chat_protocol.limits import MAX_BODY_CHARS, MAX_FRAME_BYTES, MAX_ROOMS
from chat_server import metrics
from chat_server.backends import open_store, redacted
from chat_server.backends.base import ChatStore
from chat_server.backends.postgres import PostgresStore
from chat_server.cluster import Cluster
from chat_server.config import ServerConfig
from chat_server.fanout import Delivery, Hub
from chat_server.forwarded import TrustedProxies
from chat_server.messages import Committed, Draft
from chat_server.session import Context, Session
from chat_server.store import StoreUnavailable

log = logging.getLogger(__name__)

#: How long /healthz waits for its probe write before it answers 503.
HEALTH_TIMEOUT = 3.0


class ChatServer:
    """The running server; also the store's commit listener."""

    def __init__(self, config: ServerConfig, store: ChatStore) -> None:
        self.config = config
        self.store = store
        self.hub = Hub(config.send_buffer_limit)
        #: Set when the store is shared by several replicas (PostgreSQL).
        self.cluster: Cluster | None = None
        if isinstance(store, PostgresStore):
            self.cluster = Cluster(store, self.hub, timeout=config.replica_timeout)
        self.ctx = Context(config, store, self.hub, _announced_limits(config), cluster=self.cluster)
        self.server: Server | None = None
        self._stopped = asyncio.Event()
        #: Open connections per remote IP address, for max_connections_per_ip.
        self.per_ip: Counter[str] = Counter()
        #: Behind a reverse proxy: the client's address, from X-Forwarded-For.
        self.proxies = TrustedProxies(config.trusted_proxies)
        self._client_ips: weakref.WeakKeyDictionary[ServerConnection, str] = (
            weakref.WeakKeyDictionary()
        )

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
        ip = self._client_ips.pop(connection, None) or _ip(connection)
        self.per_ip[ip] += 1
        metrics.CONNECTIONS.inc()
        try:
            await Session(self.ctx, connection, ip).run()
        finally:
            metrics.CONNECTIONS.dec()
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if request.path == "/metrics":
            data, content_type = metrics.exposition()
            response = connection.respond(HTTPStatus.OK, "")
            for name, value in (("Content-Type", content_type), ("Content-Length", len(data))):
                del response.headers[name]  # Headers is a multidict: replace, not add
                response.headers[name] = str(value)
            response.body = data
            return response
        if request.path != "/healthz":
            limit = self.config.max_connections_per_ip
            ip = await self.proxies.client_ip(
                _ip(connection), request.headers.get_all("X-Forwarded-For")
            )
            self._client_ips[connection] = ip
            if limit and self.per_ip[ip] >= limit:
                log.warning("refused %s: already %d connections from it", ip, self.per_ip[ip])
                text = f"too many connections from {ip} (limit {limit})\n"
                return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, text)
            return None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.store.probe()
        except (StoreUnavailable, TimeoutError) as exc:
            detail = self.store.last_error or type(exc).__name__
            text = f"database not writable: {detail}\n"
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, text)
        if self.cluster is not None and not self.cluster.healthy:
            text = "the live message stream (LISTEN) is not connected\n"
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, text)
        return connection.respond(HTTPStatus.OK, "OK\n")

    # --- CommitListener ----------------------------------------------------------------

    def committed(self, results: Sequence[Committed]) -> None:
        """Fan a committed batch out in id order, each sender's ack after its message."""
        hub = self.hub
        deliveries: list[Delivery] = []
        fresh = delivered = acks = 0
        for result in results:
            message = result.message
            fresh += result.fresh
            # In a cluster every replica delivers messages from the ordered stream
            # (chat_server.cluster), its own included; here only the acks.
            if result.fresh and self.cluster is None:
                recipients = hub.recipients(message)
                delivered += len(recipients)
                deliveries.append((recipients, encode(message.frame()), message))
            origin = result.draft.origin
            if isinstance(origin, Session):
                ack = {"type": "ack", "cid": message.cid, "id": message.id, "ts": message.ts}
                deliveries.append(([origin], encode(ack), None))
                acks += 1
        hub.publish_many(deliveries)
        metrics.MESSAGES.inc(fresh)
        metrics.ACKS.inc(acks)
        metrics.DELIVERIES.inc(delivered)
        metrics.BATCH_SIZE.observe(len(results))

    def failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        for draft in drafts:
            if isinstance(draft.origin, Session):
                draft.origin.error(
                    ErrorCode.UNAVAILABLE,
                    f"not stored, send it again later: {error}",
                    cid=draft.cid,
                )


def _ip(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else "?"


def _announced_limits(config: ServerConfig) -> dict[str, Any]:
    return {
        "max_frame_bytes": MAX_FRAME_BYTES,
        "max_body_chars": MAX_BODY_CHARS,
        "max_rooms": MAX_ROOMS,
        "rate": config.rate,
        "burst": config.burst,
        "resume_cap": config.resume_cap,
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
        async with serve(
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
        ) as server:
            chat.server = server
            log.info(
                "listening on %s:%d, database %s (last id %d)",
                config.host,
                chat.port,
                redacted(str(config.db)),
                store.last_id,
            )
            try:
                yield chat
            finally:
                log.info("shutting down: closing connections with 1001")
                server.close()
                await server.wait_closed()
                if chat.ctx.closing:
                    await asyncio.gather(*chat.ctx.closing, return_exceptions=True)
    finally:
        if chat.cluster is not None:
            await chat.cluster.stop()
        await store.close()
        log.info(
            "database closed; last id %d; %d messages in %d group commits",
            store.last_id,
            store.batched,
            store.batches,
        )
