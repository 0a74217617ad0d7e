"""Demo behaviour for scaled containers: announce, chat at an interval, answer !ping.

So that ``docker compose up --scale client=3`` shows the replicas talking to each other
in ``docker compose logs``. Off unless ``--demo`` / ``CHAT_DEMO=1`` (compose turns it on).
"""

from __future__ import annotations

import asyncio
import itertools

from chat_client.connection import ChatConnection, Frame
from chat_protocol.names import nick_key


class DemoBot:
    def __init__(self, connection: ChatConnection, room: str, interval: float) -> None:
        self.connection = connection
        self.room = room
        self.interval = interval
        self.announced = False
        self.paused = False  # a person is using this client's full-screen UI

    def frame(self, frame: Frame) -> None:
        """Watch frames: announce once after the first sync; answer !ping."""
        kind = frame.get("type")
        if self.paused:
            return
        if kind == "synced" and not self.announced:
            self.announced = True
            self._say(f"hello from {self.connection.nick}, a demo client (!ping me)")
        elif kind == "msg" and frame.get("room") == self.room:
            sender = str(frame.get("from", ""))
            if frame.get("body") == "!ping" and nick_key(sender) != nick_key(self.connection.nick):
                self._say(f"pong, {sender}")

    def _say(self, text: str) -> None:
        self.connection.send_message(text, room=self.room)

    async def run(self) -> None:
        for n in itertools.count(1):
            await asyncio.sleep(self.interval)
            if self.connection.synced and not self.paused:
                self._say(f"tick {n} from {self.connection.nick}")
