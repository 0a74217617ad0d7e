"""End to end on real containers: the compose deployment as users run it.

Selected with ``-m e2e``. Needs a Docker Engine with Compose v2; the images are built
from ``$PYTHON_IMAGE`` (``.ci/run`` sets it on machines that cannot pull images). The
stack runs under its own project name and host port, and is removed with its volumes.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pexpect
import pytest

from tests.helpers import Peer, peer
from tests.stack import Stack
from tests.terminal import Terminal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def wait_for(check: object, timeout: float = 60.0, interval: float = 0.5) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def collect(p: Peer, seconds: float) -> list[dict[str, object]]:
    return await p.quiet(seconds)


def demo_nicks(stack: Stack) -> set[str]:
    return {
        line.split("connected as ")[1].strip()
        for line in stack.logs("client").splitlines()
        if "connected as " in line
    }


async def test_up_scale_3_is_healthy_and_everyone_hears_everyone(stack: Stack) -> None:
    stack.up(3)
    server = stack.containers("server")
    assert len(server) == 1
    assert server[0]["Health"] == "healthy"
    clients = stack.containers("client")
    assert len(clients) == 3
    assert {c["State"] for c in clients} == {"running"}

    nick = "host-" + uuid.uuid4().hex[:6]
    async with peer(stack.url, nick) as host:
        await wait_for(lambda: len(demo_nicks(stack)) == 3)
        await host.say("hello from the host")
        # The host hears every container's demo lines ...
        heard: set[str] = set()
        async with asyncio.timeout(30):
            while heard != demo_nicks(stack):
                frame = await host.recv(10)
                if frame["type"] == "msg":
                    heard.add(str(frame["from"]))
    # ... and every container heard the host and the other containers.
    for container in stack.containers("client"):
        name = str(container["Name"])
        await wait_for(lambda name=name: "hello from the host" in container_log(name))
        log = container_log(name)
        for other in demo_nicks(stack):
            assert f"<{other}>" in log, f"{name} never heard {other}"


def container_log(name: str) -> str:
    done = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr).replace("\r", "")


async def test_scale_to_5_and_back_while_chatting(stack: Stack) -> None:
    stack.up(3)
    async with peer(stack.url, "scaler-" + uuid.uuid4().hex[:6]) as host:
        await host.quiet(1)
        before = demo_nicks(stack)
        stack.up(5)
        assert len([c for c in stack.containers("client") if c["State"] == "running"]) == 5
        await wait_for(lambda: len(demo_nicks(stack) - before) >= 2)
        new = demo_nicks(stack) - before
        joined: set[str] = set()
        async with asyncio.timeout(30):
            while not new <= joined:
                frame = await host.recv(10)
                if frame["type"] == "presence" and frame["event"] == "join":
                    joined.add(str(frame["nick"]))
        stack.up(3)
        assert len(stack.containers("client")) == 3
        await host.say("still chatting after scaling down")
        senders: set[str] = set()
        async with asyncio.timeout(30):
            while len(senders) < 3:
                frame = await host.recv(10)
                if frame["type"] == "msg":
                    senders.add(str(frame["from"]))


async def test_stop_exits_0_and_clients_see_a_clean_close(stack: Stack) -> None:
    stack.up(3)
    async with peer(stack.url, "stopper-" + uuid.uuid4().hex[:6]) as host:
        started = time.monotonic()
        stack.compose("stop", "--timeout", "10")
        elapsed = time.monotonic() - started
        assert await host.closed(10) == 1001
    codes = {str(c["Name"]): c["ExitCode"] for c in stack.containers()}
    assert set(codes.values()) == {0}, codes
    assert elapsed < 10, f"stop took {elapsed:.1f}s: something waited for SIGKILL"
    assert "database closed" in stack.logs("server")
    stack.compose("start")
    stack.up(3)


async def test_history_survives_down_and_is_gone_after_down_v(stack: Stack) -> None:
    stack.up(1)
    marker = "remember me " + uuid.uuid4().hex

    async def history_has_marker() -> bool:
        async with peer(stack.url, "hist-" + uuid.uuid4().hex[:6], history=200) as p:
            await p.send({"type": "history", "room": "lobby", "limit": 200})
            page = await p.expect("history")
            return any(m["body"] == marker for m in page["messages"])

    async with peer(stack.url, "keeper-" + uuid.uuid4().hex[:6]) as p:
        await p.say(marker)
    stack.compose("down")  # volumes kept
    stack.up(1)
    assert await history_has_marker()
    stack.compose("down", "-v")
    stack.up(1)
    assert not await history_has_marker()


async def test_full_screen_client_with_compose_run(stack: Stack) -> None:
    stack.up(1)
    nick = "human-" + uuid.uuid4().hex[:6]
    term = Terminal(
        [], env=stack.env, command=["docker", "compose", "run", "--rm", "client", "--nick", nick]
    )
    try:
        await term.wait_for(lambda s: f"{nick} | #lobby | connected" in s, timeout=60)
        async with peer(stack.url, "pinger-" + uuid.uuid4().hex[:6]) as host:
            await host.say("hello human in a container")
            await term.wait_for(lambda s: "hello human in a container" in s)
            term.type("hi from inside\r")
            got = await host.expect("msg", timeout=15)
            while got["from"] != nick:
                got = await host.expect("msg", timeout=15)
            assert got["body"] == "hi from inside"
        term.type("/quit\r")
        term.child.expect(pexpect.EOF, timeout=30)
    finally:
        term.close()


async def test_attach_to_a_replica_opens_the_full_screen_ui(stack: Stack) -> None:
    stack.up(2)
    term = Terminal(
        [], env=stack.env, command=["docker", "compose", "attach", "--index", "2", "client"]
    )
    try:
        await asyncio.sleep(2)
        term.type("\r")  # Enter opens the UI
        await term.wait_for(lambda s: "| #lobby | connected" in s, timeout=30)
        async with peer(stack.url, "visitor-" + uuid.uuid4().hex[:6]) as host:
            await host.say("can the attached one see this")
            await term.wait_for(lambda s: "can the attached one see this" in s)
        term.child.sendcontrol("p")
        term.child.sendcontrol("q")  # docker's detach keys: the replica keeps running
        term.child.expect(pexpect.EOF, timeout=15)
        assert len([c for c in stack.containers("client") if c["State"] == "running"]) == 2
    finally:
        term.close()


@pytest.mark.parametrize(
    ("service", "present", "absent"),
    [
        ("server", "chat_server", "chat_client"),
        ("server", "aiosqlite", "prompt_toolkit"),
        ("client", "chat_client", "chat_server"),
        ("client", "prompt_toolkit", "aiosqlite"),
    ],
)
def test_each_image_holds_only_its_side(
    stack: Stack, service: str, present: str, absent: str
) -> None:
    image = stack.image(service)

    def importable(module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{module}') is None)"
        done = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python", image, "-c", code],
            capture_output=True,
            timeout=60,
        )
        return done.returncode == 0

    assert importable(present)
    assert not importable(absent)
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", image, "-u"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert user.stdout.strip() != "0", "runs as root"
