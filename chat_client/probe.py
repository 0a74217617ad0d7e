"""Probe mode: send numbered messages through faults and report what arrived.

``chat-client --probe 60`` connects like any client (reconnects, resumes, resends), sends
60 numbered messages to its first room, waits until every one is acknowledged and the
room has been quiet for a while, then prints one line, ``PROBE-REPORT {json}``, and exits.
``chat-chaos`` runs several of these in containers while it breaks things, and checks
their reports against the database.

The report counts at the protocol level, below the screen's de-duplication: a ``msg``
frame whose id was already seen is a duplicate, one with a smaller id than the last is
out of order.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from chat_client.connection import ChatConnection, Frame


class Probe:
    def __init__(self, connection: ChatConnection, room: str) -> None:
        self.connection = connection
        self.room = room
        self.received: list[int] = []
        self.seen: set[int] = set()
        self.duplicated = 0
        self.out_of_order = 0
        self.last_arrival = time.monotonic()
        self.connects = 0

    def frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            self.connects += 1
        if kind != "msg" or frame.get("room") != self.room:
            return
        msg_id = frame.get("id")
        if not isinstance(msg_id, int):
            return
        self.last_arrival = time.monotonic()
        if msg_id in self.seen:
            self.duplicated += 1
            return
        if self.received and msg_id < self.received[-1]:
            self.out_of_order += 1
        self.seen.add(msg_id)
        self.received.append(msg_id)

    async def run(self, count: int, interval: float, quiet: float, limit: float) -> dict[str, Any]:
        connection = self.connection
        # Polling: these conditions change in network callbacks, a few times per second.
        while not connection.synced:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        cids = []
        for n in range(count):
            cids.append(connection.send_message(f"probe {connection.nick} {n}", room=self.room))
            await asyncio.sleep(interval)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and (  # noqa: ASYNC110
            any(connection.is_pending(cid) for cid in cids)
            or time.monotonic() - self.last_arrival < quiet
        ):
            await asyncio.sleep(0.1)
        return {
            "nick": connection.nick,
            "sent": count,
            "acked": sum(
                not connection.is_pending(cid) and cid not in connection.refused for cid in cids
            ),
            "received": self.received,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "connects": self.connects,
        }


def report_line(report: dict[str, Any]) -> str:
    return "PROBE-REPORT " + json.dumps(report, separators=(",", ":"))
