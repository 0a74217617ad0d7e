"""The baseline: a bare websockets broadcast relay, as in the library's own docs.

No protocol, no rooms, no persistence: every text frame received is broadcast to every
connected client. Whatever compose-chat costs beyond this is the price of its features.
Run as ``python -m bench.relay PORT``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()


async def relay(connection: ServerConnection) -> None:
    CLIENTS.add(connection)
    try:
        async for message in connection:
            broadcast(CLIENTS, message)
    finally:
        CLIENTS.discard(connection)


async def main(port: int) -> None:
    async with serve(relay, "127.0.0.1", port, compression=None, max_size=2**16) as server:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.close)
        await server.wait_closed()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
    else:
        uvloop.run(main(int(sys.argv[1])))
