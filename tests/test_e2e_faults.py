"""Faults on the real compose deployment while the demo clients chat.

After each fault, every client's screen (its log) must hold the room's messages exactly
once and in server order: a contiguous run of what the database holds, caught up to the
end. Keepalive is shortened (ping every 2 s, 2 s timeout) so dead peers are noticed fast.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import peer
from tests.stack import Stack, free_port, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PING = 2  # seconds, interval and timeout alike
LINE = re.compile(r"^\d\d:\d\d:\d\d #lobby <([^>]+)> (.*)$")


@pytest.fixture(scope="module")
def chaos() -> Iterator[Stack]:
    with running_stack(CHAT_PING_INTERVAL=str(PING), CHAT_PING_TIMEOUT=str(PING)) as s:
        s.up(3)
        yield s


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr}")
    return (done.stdout + done.stderr).replace("\r", "")


def stored(stack: Stack) -> list[tuple[str, str]]:
    code = (
        "import json, sqlite3; db = sqlite3.connect('/data/chat.db'); "
        'print(json.dumps(db.execute("SELECT sender, body FROM messages '
        "WHERE room = 'lobby' ORDER BY id\").fetchall()))"
    )
    out = stack.compose("exec", "-T", "server", "python", "-c", code)
    return [tuple(row) for row in json.loads(out)]


def shown(container: str) -> list[tuple[str, str]]:
    lines = docker("logs", container).splitlines()
    return [(m.group(1), m.group(2)) for line in lines if (m := LINE.match(line.strip()))]


def client_names(stack: Stack) -> list[str]:
    return [str(c["Name"]) for c in stack.containers("client") if c["State"] == "running"]


def assert_exactly_once_in_order(stack: Stack, slack: int = 15) -> None:
    """Each client shows a contiguous, duplicate-free run of the stored messages."""
    views = {name: shown(name) for name in client_names(stack)}
    truth = stored(stack)
    for name, view in views.items():
        assert view, f"{name} shows nothing"
        assert len(set(view)) == len(view), f"{name} shows a message twice"
        start = truth.index(view[0])
        assert truth[start : start + len(view)] == view, f"{name}: a gap or a reordering"
        end = start + len(view)
        assert end >= len(truth) - slack, f"{name} is {len(truth) - end} messages behind"


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def test_server_restart_and_stop_start_lose_and_double_nothing(chaos: Stack) -> None:
    await settle(6)
    chaos.compose("restart", "server")
    await settle(20)
    assert_exactly_once_in_order(chaos)
    chaos.compose("stop", "server")
    await settle(5)
    chaos.compose("start", "server")
    await settle(25)
    assert_exactly_once_in_order(chaos)


async def test_network_cut_is_noticed_and_caught_up(chaos: Stack) -> None:
    victim = client_names(chaos)[0]
    nick = "client-" + docker("inspect", "-f", "{{.Config.Hostname}}", victim).strip()[:8]
    network = f"{chaos.project}_chat"
    docker("network", "disconnect", network, victim)
    cut_at = time.monotonic()
    deadline = cut_at + 3 * PING + 10
    while f"{nick} (" not in _disconnects(chaos):
        assert time.monotonic() < deadline, "the server never noticed the cut"
        await asyncio.sleep(0.5)
    noticed = time.monotonic() - cut_at
    await settle(max(0.0, 3 * PING - noticed))
    assert "reconnecting" in docker("logs", "--since", "30s", victim)
    docker("network", "connect", network, victim)
    await settle(30)  # the client's backoff may be up to 16 s by now
    assert noticed <= 2 * PING + 5, f"took {noticed:.1f}s to notice"
    assert_exactly_once_in_order(chaos)


def _disconnects(stack: Stack) -> str:
    return "\n".join(line for line in stack.logs("server").splitlines() if "disconnected" in line)


async def test_frozen_client_is_dropped_and_does_not_slow_others(chaos: Stack) -> None:
    victim = client_names(chaos)[1]
    nick = "client-" + docker("inspect", "-f", "{{.Config.Hostname}}", victim).strip()[:8]
    before = _disconnects(chaos).count(f"{nick} (")
    docker("pause", victim)
    paused_at = time.monotonic()
    try:
        async with peer(chaos.url, "watch-" + uuid.uuid4().hex[:6]) as host:
            worst = 0.0
            n = 0
            while _disconnects(chaos).count(f"{nick} (") == before:
                assert time.monotonic() - paused_at < 2 * PING + 10, "frozen client never dropped"
                started = time.monotonic()
                n += 1
                await host.say(f"are you there {n}")  # numbered: every line is unique
                worst = max(worst, time.monotonic() - started)
            dropped_after = time.monotonic() - paused_at
        assert worst < 1.0, f"a send took {worst:.2f}s while a client was frozen"
        assert dropped_after <= 2 * PING + 5
    finally:
        docker("unpause", victim)
    await settle(30)
    assert_exactly_once_in_order(chaos)


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def health_becomes(port: int, status: int, within: float = 5.0) -> bool:
    """/healthz answers ``status`` within a few seconds (its answer is reused for 1 s)."""
    deadline = time.monotonic() + within
    while health(port) != status:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def test_disk_full_stops_acks_then_recovers(chaos: Stack) -> None:
    """The server alone, its database on a 2 MiB tmpfs that we fill and then free."""
    port = free_port()
    name = f"{chaos.project}-diskfull"
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--tmpfs",
        "/data:rw,size=2m,uid=10001",  # owned by the image's user
        "-p",
        f"127.0.0.1:{port}:8765",
        chaos.image("server"),
    )
    try:
        url = f"ws://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if health(port) == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, docker("logs", name)
            await asyncio.sleep(0.3)
        async with peer(url, "filler") as p:
            first = await p.say("stored before the disk filled")
            docker("exec", name, "sh", "-c", "cat /dev/zero > /data/filler", check=False)
            refused = None
            for n in range(200):
                await p.send(
                    {"type": "send", "cid": f"full-{n}", "room": "lobby", "body": "x" * 3000}
                )
                frame = await p.recv(10)
                while frame["type"] not in ("ack", "error"):
                    frame = await p.recv(10)
                if frame["type"] == "error":
                    refused = frame
                    break
            assert refused is not None, "the disk never filled"
            assert refused["code"] == "unavailable"
            assert await health_becomes(port, 503)
            assert "database not writable" in docker("logs", name)
            docker("exec", name, "rm", "/data/filler")
            assert await health_becomes(port, 200)
            again = await p.say("stored after space came back")
            assert again["id"] > first["id"]
        check = (
            "import sqlite3; db = sqlite3.connect('/data/chat.db'); "
            "print(db.execute('PRAGMA integrity_check').fetchone()[0]); "
            "print(db.execute(\"SELECT COUNT(*) FROM messages WHERE body LIKE 'stored%'\")"
            ".fetchone()[0])"
        )
        assert docker("exec", name, "python", "-c", check).split() == ["ok", "2"]
        assert docker("inspect", "-f", "{{.State.Running}}", name).strip() == "true"
    finally:
        docker("rm", "-f", name, check=False)
