"""End to end on real containers: the compose deployment as users run it.

Selected with ``-m e2e``. Needs a Docker Engine with Compose v2; the images are built
from ``$PYTHON_IMAGE`` (``.ci/run`` sets it on machines that cannot pull images). The
stack runs under its own project name and host port, and is removed with its volumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pexpect
import pytest

from tests.helpers import Peer, peer
from tests.stack import Stack
from tests.terminal import ALT_RIGHT, Terminal, alt

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def wait_for(check: object, timeout: float = 60.0, interval: float = 0.5) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def collect(p: Peer, seconds: float) -> list[dict[str, object]]:
    """Every frame that arrives within ``seconds`` (not "until a pause": demo clients
    talking every two seconds may never leave one)."""
    frames: list[dict[str, object]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                frames.append(await p.recv(seconds))
    return frames


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


def hostname(container: str) -> str:
    done = subprocess.run(
        ["docker", "inspect", "-f", "{{.Config.Hostname}}", container],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip()


def container_log(name: str) -> str:
    done = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr).replace("\r", "")


async def test_scale_to_5_and_back_while_chatting(stack: Stack) -> None:
    stack.up(3)
    async with peer(stack.url, "scaler-" + uuid.uuid4().hex[:6]) as host:
        await collect(host, 1)
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
                    joined.update(str(nick) for nick in frame["nicks"])
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


def person(tmp_path: Path, name: str, uid: int) -> tuple[dict[str, str], str]:
    """A person's own state directory on the host, and the user their client runs as.

    As root (CI here), the directory belongs to a made-up non-root uid, to show that a
    non-root container user can keep its secrets there; otherwise, to this user.
    """
    home = tmp_path / name
    home.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(home, uid, uid)
        user = f"{uid}:{uid}"
    else:
        user = f"{os.getuid()}:{os.getgid()}"
    return {"CHAT_STATE_DIR": str(home)}, user


def chat_run(stack: Stack, env: dict[str, str], user: str, nick: str) -> Terminal:
    """The README's command for a person's client: docker compose run … chat --nick NICK."""
    command = ["docker", "compose", "run", "--rm", "--user", user, "chat", "--nick", nick]
    return Terminal([], env={**stack.env, **env}, command=command)


async def test_full_screen_client_with_compose_run_and_alt_keys(
    stack: Stack, tmp_path: Path
) -> None:
    stack.up(1)
    nick = "human-" + uuid.uuid4().hex[:6]
    env, user = person(tmp_path, "human", 2001)
    term = chat_run(stack, env, user, nick)
    try:
        await term.wait_for(lambda s: f"│ {nick} │ 2:#lobby" in s and "│ connected" in s, 90)
        async with peer(stack.url, "pinger-" + uuid.uuid4().hex[:6]) as host:
            await host.say("hello human in a container")
            await term.wait_for(lambda s: "hello human in a container" in s)
            term.type("hi from inside\r")
            got = await host.expect("msg", timeout=15)
            while got["from"] != nick:
                got = await host.expect("msg", timeout=15)
            assert got["body"] == "hi from inside"
        # Docker holds Ctrl-P back (its detach prefix): the Alt keys are the ones that work.
        term.type("/join dev\r")
        await term.wait_for(lambda s: s.splitlines()[-1].startswith("[#dev]"))
        term.type(alt("2"))
        await term.wait_for(lambda s: s.splitlines()[-1].startswith("[#lobby]"))
        term.type(ALT_RIGHT)
        await term.wait_for(lambda s: s.splitlines()[-1].startswith("[#dev]"))
        term.type(alt("1"))
        await term.wait_for(lambda s: s.splitlines()[-1].startswith("[server]"))
        term.type("/quit\r")
        term.child.expect(pexpect.EOF, timeout=30)
    finally:
        term.close()


async def test_one_nick_from_the_host_and_from_compose_run_after_one_yes(
    stack: Stack, tmp_path: Path
) -> None:
    """The host's client (127.0.0.1) and `docker compose run chat` (server:8765) share one
    person's secret; the second URL gets it only after the person says yes, once."""
    stack.up(1)
    nick = "both-" + uuid.uuid4().hex[:6]
    env, user = person(tmp_path, "both", 2003)
    home = Path(env["CHAT_STATE_DIR"])
    host = await asyncio.to_thread(host_client, stack.url, home, user, nick)
    assert host.returncode == 0, host.stderr
    term = chat_run(stack, env, user, nick)
    try:
        await term.wait_for(lambda s: "Trust ws://server:8765" in s and "(y/n)" in s, 90)
        assert "│ connected" not in term.status()
        term.type("y")
        await term.wait_for(lambda s: f"│ {nick} │" in s and "│ connected" in s, timeout=30)
        term.type("/quit\r")
        term.child.expect(pexpect.EOF, timeout=30)
    finally:
        term.close()
    urls = await asyncio.to_thread(trusted_urls, home, nick)
    assert urls == [stack.url, "ws://server:8765"]


def host_client(url: str, home: Path, user: str, nick: str) -> subprocess.CompletedProcess[str]:
    """The person's client on the host, in line mode; its files are the person's (as root,
    handed to the made-up uid the person's container runs as)."""
    command = [sys.executable, "-m", "chat_client", "--url", url, "--nick", nick]
    command += ["--state-dir", str(home), "--mode", "line"]
    done = subprocess.run(command, input="from the host\n", capture_output=True, text=True)
    if os.getuid() == 0:
        uid, gid = (int(part) for part in user.split(":"))
        for path in [home, *home.rglob("*")]:
            os.chown(path, uid, gid)
    return done


def trusted_urls(home: Path, nick: str) -> list[str]:
    (urls,) = home.glob(f"secrets/epoch-*/{nick}.urls")
    return urls.read_text().splitlines()


async def test_alice_cannot_take_bobs_nick_and_replicas_keep_their_own_secrets(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 10.9: on the deployment, a person's secret is only in that person's directory."""
    stack.up(2)
    bob_env, bob_user = person(tmp_path, "bob", 2001)
    alice_env, alice_user = person(tmp_path, "alice", 2002)
    bob = chat_run(stack, bob_env, bob_user, "bob")
    alice = None
    try:
        await bob.wait_for(lambda s: "│ bob │" in s and "│ connected" in s, timeout=90)
        alice = chat_run(stack, alice_env, alice_user, "alice")
        await alice.wait_for(lambda s: "│ alice │" in s and "│ connected" in s, timeout=90)
        alice.type("/nick bob\r")
        await alice.wait_for(lambda s: "the nick bob is registered to someone else" in s)
        alice.type("still alice\r")
        await bob.wait_for(lambda s: "<alice> still alice" in s)
        assert "│ connected" in bob.status() and "│ bob │" in bob.status()
        secrets = [p for p in (tmp_path / "alice").rglob("*") if p.is_file()]
        assert all(p.name != "bob" for p in secrets), secrets
        [bobs] = [p for p in (tmp_path / "bob").rglob("bob") if p.is_file()]
        assert bobs.stat().st_mode & 0o777 == 0o600
        alice.type("/quit\r")
        bob.type("/quit\r")
    finally:
        bob.close()
        if alice is not None:
            alice.close()

    # Demo replicas: each has its own volume; one cannot take another's nick.
    second = next(c for c in stack.containers("client") if str(c["Name"]).endswith("-2"))
    other = "client-" + hostname(str(second["Name"]))[:8]
    command = ["docker", "compose", "attach", "--index", "1", "client"]
    term = Terminal([], env=stack.env, command=command)
    try:
        await term.wait_for(lambda s: "press Enter to chat here" in s, timeout=30)
        term.type("\r")
        await term.wait_for(lambda s: "│ connected" in s, timeout=30)
        term.type(f"/nick {other}\r")
        await term.wait_for(lambda s: f"the nick {other} is registered to someone else" in s)
        term.type("/quit\r")
        await term.wait_for(lambda s: "back in demo mode" in s, timeout=30)
        term.child.sendcontrol("p")
        term.child.sendcontrol("q")
        term.child.expect(pexpect.EOF, timeout=15)
    finally:
        term.close()


async def test_attach_hints_opens_the_ui_and_quit_goes_back_to_demo(stack: Stack) -> None:
    stack.up(2)
    term = Terminal(
        [], env=stack.env, command=["docker", "compose", "attach", "--index", "2", "client"]
    )
    try:
        # Attaching resizes the terminal: the replica says again what to do.
        await term.wait_for(lambda s: "press Enter to chat here" in s, timeout=30)
        term.type("\r")  # Enter opens the UI
        await term.wait_for(lambda s: "2:#lobby" in s and "│ connected" in s, timeout=30)
        async with peer(stack.url, "visitor-" + uuid.uuid4().hex[:6]) as host:
            await host.say("can the attached one see this")
            await term.wait_for(lambda s: "can the attached one see this" in s)
        # /quit in an attached replica does not stop it: it goes back to its demo.
        term.type("/quit\r")
        await term.wait_for(lambda s: "back in demo mode" in s, timeout=30)
        name = str(stack.containers("client")[1]["Name"])
        before = container_log(name).count(" tick ")
        await wait_for(lambda: container_log(name).count(" tick ") > before, timeout=30)
        term.child.sendcontrol("p")
        term.child.sendcontrol("q")  # docker's detach keys: the replica keeps running
        term.child.expect(pexpect.EOF, timeout=15)
        assert len([c for c in stack.containers("client") if c["State"] == "running"]) == 2
    finally:
        term.close()


async def test_foreground_up_shows_no_full_screen_ui_and_no_health_check_lines(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 12.8: the operator's `docker compose up` stays a readable log."""
    stack.up(1)
    up = Terminal([], env=stack.env, command=["docker", "compose", "up", "--scale", "client=1"])
    env, user = person(tmp_path, "visitor", 2003)
    visitor = None
    try:
        await up.wait_for(lambda s: "tick" in s, timeout=60)
        visitor = chat_run(stack, env, user, "visitor")
        await visitor.wait_for(lambda s: "│ connected" in s, timeout=90)
        visitor.type("hello from a run container\r")
        await up.wait_for(lambda s: "<visitor> hello from a run container" in s, timeout=30)
        visitor.type("/quit\r")
        visitor.child.expect(pexpect.EOF, timeout=30)
        await asyncio.sleep(12)  # two health checks
        raw = bytes(up.raw)
        assert b"\x1b[?1049h" not in raw, "a full-screen UI reached the operator's terminal"
        text = raw.decode(errors="replace")
        assert "HTTP response sent" not in text and "connection closed" not in text
        assert "visitor" in text  # the server's own line says who came
    finally:
        if visitor is not None:
            visitor.close()
        up.child.kill(signal.SIGKILL)  # leave the stack running for the other tests


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


def test_the_server_port_is_published_on_this_host_only_unless_asked(stack: Stack) -> None:
    """The README promises 127.0.0.1:8765; CHAT_PUBLISH_ADDRESS opens it to other machines."""

    def published(on: Stack, *files: str) -> list[tuple[str, str]]:
        args = [arg for file in files for arg in ("-f", file)]
        services = json.loads(on.compose(*args, "config", "--format", "json"))["services"]
        return [
            (port.get("host_ip", "0.0.0.0"), str(port["published"]))
            for service in services.values()
            for port in service.get("ports") or []
        ]

    opened = dataclasses.replace(stack, env={**stack.env, "CHAT_PUBLISH_ADDRESS": "0.0.0.0"})
    cluster = ("compose.yaml", "compose.cluster.yaml")
    assert published(stack) == [("127.0.0.1", str(stack.port))]
    assert published(opened) == [("0.0.0.0", str(stack.port))]
    assert published(stack, *cluster) == [("127.0.0.1", str(stack.port))]
    assert published(opened, *cluster) == [("0.0.0.0", str(stack.port))]
