"""GET /metrics: Prometheus text that follows what the server does."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import peer, server
from tests.stores import db_on_both_stores  # noqa: F401 (db: SQLite and PostgreSQL)


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics, by name and labels, e.g. ``chat_errors_total{code=x}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_connections_messages_acks_errors_and_commits(db: Path) -> None:
    async with server(db) as chat:
        before = await asyncio.to_thread(scrape, chat.port)
        async with peer(chat, "alice") as alice, peer(chat, "bob") as bob:
            for n in range(5):
                await alice.say(f"m{n}")
            await alice.say("m0", cid="again")
            await alice.say("m0", cid="again")  # a retry: an ack, no new message
            await bob.send({"type": "send", "cid": "x", "room": "nowhere", "body": "hi"})
            while (frame := await bob.recv())["type"] != "error":
                assert frame["type"] in ("msg", "presence")
            assert frame["code"] == "not_in_room"
            during = await asyncio.to_thread(scrape, chat.port)
        after = await asyncio.to_thread(scrape, chat.port)

    def delta(name: str, at: dict[str, float] = during) -> float:
        return at.get(name, 0.0) - before.get(name, 0.0)

    assert delta("chat_connections") == 2
    assert delta("chat_connections", after) == 0
    assert delta("chat_messages_total") == 6
    assert delta("chat_acks_total") == 7
    assert delta("chat_deliveries_total") == 12  # 6 messages to 2 members
    assert delta("chat_errors_total{code=not_in_room}") == 1
    assert delta("chat_commit_seconds_count") == delta("chat_batch_messages_count") >= 1
    assert delta("chat_batch_messages_sum") == 7
    assert "process_resident_memory_bytes" in after
