"""The server: wires the store, the hub, presence, quotas and sessions to the connection
layer (``connections.py``: asyncio protocols over websockets' Sans-I/O, no task per
idle connection).

``/healthz`` is answered on the same port, before any WebSocket handshake. Shutdown, in
this order: stop accepting, drop connections that never finished their handshake, close
every client with 1001, drop within ``shutdown_timeout`` whatever has not finished
closing, wait for the sessions' cancelled work, then let the writer commit what is queued
before the database is closed (on PostgreSQL all of that within ``TEARDOWN_TIMEOUT``:
a database that does not answer is given up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from websockets.http11 import Request, Response

from chat_protocol.limits import (
    EPOCH_HEADER,
    MAX_BODY_CHARS,
    MAX_FRAME_BYTES,
    MAX_ROOMS,
    MEMBERS_MAX,
)
from chat_server import metrics
from chat_server.backends import open_store, redacted
from chat_server.backends.base import ChatStore, StoreFailed, StoreUnavailable
from chat_server.backends.postgres import PostgresStore
from chat_server.cluster import Cluster
from chat_server.config import ServerConfig
from chat_server.connections import Connection, WebSocketServer
from chat_server.fanout import Delivery, Hub
from chat_server.forwarded import TrustedProxies
from chat_server.messages import Committed, Draft, EncodedFrames
from chat_server.presence import Presence
from chat_server.ratelimit import Limit, Quotas, Rule
from chat_server.recent import RecentRooms
from chat_server.session import Context, Session, Slot
from chat_server.shared_limits import SharedQuotas

log = logging.getLogger(__name__)

#: How long /healthz waits for its probe write before it answers 503.
HEALTH_TIMEOUT = 3.0
#: Seconds a shutdown gives the store once the connections are closed: the writer's queue,
#: in a cluster the quota charges and the goodbye to the other replicas. PostgreSQL that
#: does not answer (a partition, a paused container) is then given up, so the process
#: still exits well inside Docker's 10 s grace.
TEARDOWN_TIMEOUT = 1.5
#: How long a successful /healthz probe is reused: a flood of checks costs one write a
#: second. A failure is not reused: the next check probes again (a failed probe commits
#: nothing), so recovery shows at once.
HEALTH_CACHE = 1.0


class ChatServer:
    """The running server; also the store's commit listener."""

    def __init__(self, config: ServerConfig, store: ChatStore) -> None:
        self.config = config
        self.store = store
        self.hub = Hub(config.send_buffer_limit, config.delivery_window_ms / 1000)
        presence = Presence(self.hub)
        encoded = EncodedFrames()
        #: Set when the store is shared by several replicas (PostgreSQL).
        self.cluster: Cluster | None = None
        self.quotas = Quotas(_rules(config))
        if isinstance(store, PostgresStore):
            self.cluster = Cluster(
                store, self.hub, presence, timeout=config.replica_timeout, encoded=encoded
            )
            self.quotas = SharedQuotas(
                _rules(config),
                store,
                self.cluster.replica,
                connections=lambda: self.server.per_address,
            )
        self.ctx = Context(
            config,
            store,
            self.hub,
            presence,
            self.quotas,
            _announced_limits(config),
            cluster=self.cluster,
            encoded=encoded,
        )
        if self.cluster is None:
            self.ctx.recent = RecentRooms(store, self.ctx.catchups, watermark=store.last_id)
        self.ctx.delivered.advance(store.last_id)
        #: Behind a reverse proxy: the client's address, from X-Forwarded-For.
        self.proxies = TrustedProxies(config.trusted_proxies)
        self.server = WebSocketServer(
            self.open,
            responder=self.respond,
            # Which database this is, before hello: clients file nick secrets by it.
            accept_headers={EPOCH_HEADER: store.epoch},
            max_size=MAX_FRAME_BYTES,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=config.close_timeout,
            handshake_timeout=config.handshake_timeout,
            max_connections_per_address=config.max_connections_per_ip,
            # HAProxy's connections carry many clients: limited once X-Forwarded-For names
            # each one, not refused at accept for being many.
            proxy=self.proxies.known,
            tick=_tick(config),
        )
        self._stopped = asyncio.Event()
        self._healthy_at: float | None = None  # when a probe last committed
        self._health_probe: asyncio.Task[str | None] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        """Begin a graceful shutdown (signal handlers call this); safe to call twice."""
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- connection layer hooks ------------------------------------------------------

    def open(self, connection: Connection, request: Request) -> Session:
        """A WebSocket handshake succeeded: its session."""
        log.info(
            "connection from %s (%s)", connection.remote, request.headers.get("User-Agent", "?")
        )
        session = Session(self.ctx, connection)
        session.opened()
        return session

    async def respond(self, connection: Connection, request: Request) -> Response | None:
        """Answer plain HTTP (``/healthz``, ``/metrics``, 429 over the HTTP rate), or None:
        go on with the WebSocket handshake (the layer applies the connection limit per
        address; in a cluster it is checked here against every replica's count too).

        Behind a trusted proxy the client's address comes from ``X-Forwarded-For``.
        """
        forwarded = request.headers.get_all("X-Forwarded-For")
        ip = connection.ip = await self.proxies.client_ip(connection.ip, forwarded)
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
        limit = self.config.max_connections_per_ip
        if limit and isinstance(self.quotas, SharedQuotas):
            here = self.server.per_address.get(ip, 0)
            if here + self.quotas.elsewhere.get(ip, 0) >= limit:
                log.warning("refused %s: already %d connections from it in the cluster", ip, limit)
                text = f"too many connections from {ip} (limit {limit})\n"
                return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, text)
        return None

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
        probe = self._health_probe
        if probe is None:
            probe = self._health_probe = asyncio.create_task(self._probe())
        # The probe's own timeout may not end it: cancelling a PostgreSQL query waits for
        # the server to confirm, and a paused server never does. Answer on time anyway.
        done, _ = await asyncio.wait({probe}, timeout=HEALTH_TIMEOUT + 0.5)
        if not done:
            return f"the database did not answer a probe write within {HEALTH_TIMEOUT:g} s"
        return probe.result()

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
        delivered = fresh = acks = newest = 0
        # In a cluster every replica delivers messages from the ordered stream
        # (chat_server.cluster), its own commits included; here only the answers.
        if self.cluster is None:
            fresh_messages = [r.message for r in results if r.fresh]
            if self.ctx.recent is not None:
                self.ctx.recent.committed(fresh_messages)
            # Fresh messages come in id order; a retry's id was delivered long ago.
            if fresh_messages:
                newest = fresh_messages[-1].id
            deliveries, delivered = hub.deliveries(
                fresh_messages,
                self.ctx.presence.before_messages,
                self.ctx.encoded,
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
        hub.publish_many(deliveries, now=answered)
        if self.cluster is None:
            self.ctx.delivered.advance(newest)
        metrics.MESSAGES.inc(fresh)
        metrics.ACKS.inc(acks)
        metrics.DELIVERIES.inc(delivered)
        metrics.BATCH_SIZE.observe(len(results))

    def failed(self, drafts: Sequence[Draft], error: Exception) -> None:
        for draft in drafts:
            slot = draft.origin
            if isinstance(slot, Slot):
                slot.owner.refused(slot, error)


def _tick(config: ServerConfig) -> float:
    """How often the connection layer's sweep runs: a quarter of the shortest deadline it
    enforces, at most once a second and at least every 50 ms."""
    deadlines = [
        config.handshake_timeout,
        config.hello_timeout,
        config.close_timeout,
        config.ping_interval,
        config.ping_timeout,
    ]
    return min(1.0, max(0.05, min(d for d in deadlines if d > 0) / 4))


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


async def _leave_cluster(chat: ChatServer, store: PostgresStore) -> None:
    """Charge the pending quotas, say goodbye to the other replicas and let the writer
    commit its queue, within ``TEARDOWN_TIMEOUT``; then drop every connection to
    PostgreSQL, so that what still waits on it fails at once (what the writer held was
    never acknowledged: clients resend it by cid)."""

    async def leave() -> None:
        if isinstance(chat.quotas, SharedQuotas):
            await chat.quotas.stop()
        if chat.cluster is not None:
            await chat.cluster.stop()
        await store.close()

    work = asyncio.ensure_future(leave())
    done, _ = await asyncio.wait([work], timeout=TEARDOWN_TIMEOUT)
    if not done:
        log.warning(
            "PostgreSQL did not answer within %.1f s: dropping its connections", TEARDOWN_TIMEOUT
        )
        store.terminate()
        if chat.cluster is not None:
            chat.cluster.terminate()
        done, _ = await asyncio.wait([work], timeout=0.5)
        if not done:
            log.error("the store did not close after its connections were dropped")
            work.cancel()
            return
    work.result()


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
        await chat.proxies.resolve()
        await chat.server.listen(config.host, config.port)
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
            await chat.server.shutdown(grace=config.shutdown_timeout)
    finally:
        if isinstance(store, PostgresStore):
            await _leave_cluster(chat, store)
        else:
            await store.close()
        log.info(
            "database closed; last id %d; %d messages in %d group commits",
            store.last_id,
            store.batched,
            store.batches,
        )
