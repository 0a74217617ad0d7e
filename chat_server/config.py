"""Server configuration: the only place that reads flags and the environment.

Every setting has a flag and a ``CHAT_*`` environment variable; a flag wins. Tests build
:class:`ServerConfig` directly (port 0, a temp file) and never touch the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import get_args

from chat_protocol.limits import MAX_SERVER_FRAME_BYTES
from chat_server.backends.sqlite import Synchronous


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    #: The store: a SQLite file (a path or ``sqlite:///path``) or ``postgresql://...``.
    db: str = "chat.db"
    #: SQLite ``synchronous`` in WAL mode. FULL: an acknowledged message survives power
    #: loss. NORMAL: it survives a crash of the server process (kill -9) but the last
    #: commits may be lost if the machine itself loses power.
    synchronous: Synchronous = "FULL"
    #: Most messages in one group commit.
    batch_max: int = 512
    #: Milliseconds the writer lingers after the first message of a batch, so that one
    #: commit and one socket write per recipient carry several messages.
    batch_wait_ms: float = 1.0
    #: The delivery window: under continuous traffic, each client gets at most one
    #: socket write per window, so that several commits share it; a frame waits at most
    #: this long (0: every commit is written at once; see chat_server.fanout).
    delivery_window_ms: float = 10.0
    #: Messages waiting for the writer before senders are made to wait.
    queue_max: int = 10_000
    #: Token buckets: frames per second (and burst) per connection, and the same for
    #: messages per nick across all of its connections, reconnects included.
    rate: float = 20.0
    burst: int = 40
    #: Frames over the rate in a row before the server closes the connection (1008).
    flood_strikes: int = 20
    #: Bytes a client may have waiting unsent before the server drops it (1008).
    send_buffer_limit: int = 1024 * 1024
    #: Most messages replayed on resume; past it the client gets a ``gap`` frame.
    resume_cap: int = 1000
    #: Most bytes of ``msg`` frames in one replay (the newest that fit); then a ``gap``.
    resume_bytes: int = 1024 * 1024
    #: Most bytes of messages in one ``history`` reply (always at least one message).
    history_bytes: int = 128 * 1024
    #: Bytes of history for all rooms of one ``hello`` together (an equal share each).
    catchup_bytes: int = 1024 * 1024
    #: Catch-ups (hello, join, history, rooms) reading the database at once, server-wide.
    catchup_concurrency: int = 4
    #: Seconds after which an unconfirmed nick registration may be claimed afresh.
    nick_claim_ttl: float = 3600.0
    # Per address (0: no limit). Generous on purpose: a classroom behind one NAT, or
    # every host client of the compose deployment, arrives from one address.
    #: Open connections from one address; more get HTTP 429.
    max_connections_per_ip: int = 64
    #: Reverse proxies whose X-Forwarded-For is believed: comma-separated addresses,
    #: networks or host names (``haproxy``). Empty: the peer's address is the client's.
    trusted_proxies: str = ""
    #: Messages per second (and burst) from one address, all nicks together.
    address_rate: float = 200.0
    address_burst: int = 400
    #: Catch-up units per second (and burst) from one address: a hello costs one per
    #: room plus one, a join, history or rooms request one.
    catchup_rate: float = 20.0
    catchup_burst: int = 200
    #: New rooms and new nick registrations per hour from one address.
    rooms_per_hour: int = 500
    nicks_per_hour: int = 300
    #: HTTP requests (WebSocket handshakes and /healthz) per second (and burst) per address.
    http_rate: float = 20.0
    http_burst: int = 200
    #: Seconds a new TCP connection has to finish the WebSocket handshake.
    handshake_timeout: float = 10.0
    #: Seconds a new connection has to send ``hello``.
    hello_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    #: Seconds a shutdown waits for closing handshakes before it drops what is left.
    shutdown_timeout: float = 2.0
    #: PostgreSQL only: seconds without a heartbeat before a replica counts as dead and
    #: its sessions end (the others announce them as gone).
    replica_timeout: float = 10.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 1024 <= self.history_bytes <= MAX_SERVER_FRAME_BYTES // 2:
            raise ValueError(f"history_bytes must be 1024-{MAX_SERVER_FRAME_BYTES // 2}")
        for name in ("catchup_bytes", "resume_bytes"):
            if getattr(self, name) < 1024:
                raise ValueError(f"{name} must be at least 1024")
        if self.resume_cap < 1 or self.catchup_concurrency < 1:
            raise ValueError("resume_cap and catchup_concurrency must be at least 1")
        if not 0 <= self.delivery_window_ms <= 1000:
            raise ValueError("delivery_window_ms must be 0-1000")


_ENV = {f.name: "CHAT_" + f.name.upper() for f in fields(ServerConfig)}

_HELP = {
    "host": "address to listen on",
    "port": "TCP port for WebSocket and /healthz (0: any free port)",
    "db": "database: a SQLite file (path or sqlite:///path) or postgresql://user:pw@host/db",
    "synchronous": "SQLite synchronous mode (FULL survives power loss, NORMAL a crash)",
    "batch_max": "most messages in one group commit (at most 2000)",
    "batch_wait_ms": "milliseconds a batch waits for more messages before its commit",
    "delivery_window_ms": "most milliseconds a message waits to share a socket write (0: none)",
    "queue_max": "messages queued for the writer before senders wait",
    "rate": "frames per second per connection, and messages per second per nick",
    "burst": "burst of frames per connection, and of messages per nick",
    "flood_strikes": "frames over the rate in a row before disconnecting (1008)",
    "send_buffer_limit": "bytes of unsent frames before a slow client is dropped (1008)",
    "resume_cap": "most messages replayed on resume before a gap is reported",
    "resume_bytes": "most bytes of messages replayed on resume before a gap is reported",
    "history_bytes": "most bytes of messages in one history reply (at most 512 KiB)",
    "catchup_bytes": "bytes of history shared by all rooms of one hello",
    "catchup_concurrency": "catch-ups reading the database at once, server-wide",
    "nick_claim_ttl": "seconds before an unconfirmed nick registration may be claimed afresh",
    "max_connections_per_ip": "open connections from one IP address, 0 for no limit (429)",
    "trusted_proxies": "proxies whose X-Forwarded-For gives the client address (names, CIDRs)",
    "address_rate": "messages per second from one address, 0 for no limit",
    "address_burst": "burst of messages from one address",
    "catchup_rate": "catch-up units per second from one address, 0 for no limit",
    "catchup_burst": "burst of catch-up units from one address",
    "rooms_per_hour": "new rooms per hour from one address, 0 for no limit",
    "nicks_per_hour": "nick registrations per hour from one address, 0 for no limit",
    "http_rate": "handshakes and /healthz requests per second from one address, 0 for no limit",
    "http_burst": "burst of handshakes and /healthz requests from one address",
    "handshake_timeout": "seconds for a new connection to finish the WebSocket handshake",
    "hello_timeout": "seconds a connection has to send hello",
    "ping_interval": "seconds between keepalive pings (0: none)",
    "ping_timeout": "seconds to wait for a pong before closing",
    "close_timeout": "seconds to wait for a closing handshake",
    "shutdown_timeout": "seconds a shutdown waits for closing handshakes, then drops the rest",
    "replica_timeout": "PostgreSQL: seconds of silence before a replica counts as dead",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    env = os.environ if environ is None else environ
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="chat-server",
        description="compose-chat server: WebSocket chat with durable SQLite history.",
        epilog="Each flag can also be set by the environment variable shown in brackets.",
    )
    for field in fields(ServerConfig):
        default = getattr(defaults, field.name)
        kind = type(default)
        name = field.name
        choices = get_args(Synchronous) if name == "synchronous" else None
        raw = env.get(_ENV[name])
        try:
            value = kind(raw) if raw is not None else default
        except ValueError:
            parser.error(f"{_ENV[name]}={raw!r} is not a valid {kind.__name__}")
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=value,
            choices=choices,
            help=f"{_HELP[name]} [{_ENV[name]}, default {default}]",
        )
    args = parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
