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

from chat_server.store import Synchronous


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
    #: Messages waiting for the writer before senders are made to wait.
    queue_max: int = 10_000
    #: Per-connection token bucket: frames per second and burst size.
    rate: float = 20.0
    burst: int = 40
    #: Frames over the rate in a row before the server closes the connection (1008).
    flood_strikes: int = 20
    #: Bytes a client may have waiting unsent before the server drops it (1008).
    send_buffer_limit: int = 1024 * 1024
    #: Most messages replayed on resume; past it the client gets a ``gap`` frame.
    resume_cap: int = 1000
    #: Open connections allowed from one IP address (0: no limit); more get HTTP 429.
    max_connections_per_ip: int = 64
    #: Reverse proxies whose X-Forwarded-For is believed: comma-separated addresses,
    #: networks or host names (``haproxy``). Empty: the peer's address is the client's.
    trusted_proxies: str = ""
    #: Seconds a new TCP connection has to finish the WebSocket handshake.
    handshake_timeout: float = 10.0
    #: Seconds a new connection has to send ``hello``.
    hello_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    #: PostgreSQL only: seconds without a heartbeat before a replica counts as dead and
    #: its sessions end (others announce them as gone).
    replica_timeout: float = 10.0
    log_level: str = "INFO"


_ENV = {f.name: "CHAT_" + f.name.upper() for f in fields(ServerConfig)}

_HELP = {
    "host": "address to listen on",
    "port": "TCP port for WebSocket and /healthz (0: any free port)",
    "db": "database: a SQLite file (path or sqlite:///path) or postgresql://user:pw@host/db",
    "synchronous": "SQLite synchronous mode (FULL survives power loss, NORMAL a crash)",
    "batch_max": "most messages in one group commit (at most 2000)",
    "batch_wait_ms": "milliseconds a batch waits for more messages before its commit",
    "queue_max": "messages queued for the writer before senders wait",
    "rate": "frames per second a client may send",
    "burst": "frames a client may send in a burst",
    "flood_strikes": "frames over the rate in a row before disconnecting (1008)",
    "send_buffer_limit": "bytes of unsent frames before a slow client is dropped (1008)",
    "resume_cap": "most messages replayed on resume before a gap is reported",
    "max_connections_per_ip": "open connections from one IP address, 0 for no limit (429)",
    "trusted_proxies": "proxies whose X-Forwarded-For gives the client address (names, CIDRs)",
    "handshake_timeout": "seconds for a new connection to finish the WebSocket handshake",
    "hello_timeout": "seconds a connection has to send hello",
    "ping_interval": "seconds between keepalive pings (0: none)",
    "ping_timeout": "seconds to wait for a pong before closing",
    "close_timeout": "seconds to wait for a closing handshake",
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
    return ServerConfig(**vars(args))
