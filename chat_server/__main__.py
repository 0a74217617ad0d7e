"""``python -m chat_server`` / ``chat-server``: run until SIGTERM or SIGINT, then exit 0."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
import sqlite3
import sys
from collections.abc import Sequence

from chat_server.app import running_server
from chat_server.backends import redacted
from chat_server.backends.base import StoreUnavailable
from chat_server.config import ServerConfig, parse_config
from chat_server.connections import raise_open_file_limit


async def serve(config: ServerConfig) -> None:
    async with running_server(config) as chat:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, chat.stop)
        await chat.wait_stopped()
        logging.getLogger("chat_server").info("stop requested")


#: glibc's mallopt() parameter, and the size above which blocks get their own mapping.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024


def give_back_freed_memory() -> None:
    """Make large freed blocks go back to the system (Linux, glibc).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
    after a burst of large buffers (replies piling up for clients that do not read, in
    the asyncio transport's bytearray) later ones come from the heap, and freed memory
    stays with the process: RSS stayed 25-45 MiB above its baseline after each such
    burst, clients long gone. A fixed threshold turns that adjustment off.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


#: Allocations (minus frees) between two collections of the youngest generation.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect cycles less often, and never scan what was there at start.

    The server makes few reference cycles (a reconnect storm of 2,000 clients left 741
    for the collector) but allocates fast, and every young collection scans all young
    objects: at Python's default (every 700 allocations) collections took 0.29 s of the
    server's core in a 3.3-s storm. Every 20,000 they took 0.10 s; each pause stays
    about a millisecond. ``gc.freeze()`` moves the objects of start-up (modules,
    classes, the configuration) out of the collector's sight for good.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Our sessions log each connection and close (with who and why); websockets' own
    # INFO lines would repeat them, and add two per health check every 5 s in compose.
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
    raise_open_file_limit()
    give_back_freed_memory()
    try:
        import uvloop  # optional: pip install 'compose-chat[speed]'
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    tune_gc()
    try:
        runner(serve(config))
    except (OSError, ValueError, sqlite3.Error, StoreUnavailable) as exc:
        logging.getLogger("chat_server").critical(
            "cannot start: %s (database %s)", exc, redacted(str(config.db))
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
