"""The cluster deployment as users run it: compose.yaml + compose.cluster.yaml.

Three server replicas behind HAProxy on PostgreSQL, demo clients, and a peer on the host
that connects through the one published port. Selected with ``-m e2e``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import Peer, peer
from tests.stack import Stack, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CLUSTER = "compose.yaml:compose.cluster.yaml"
JOINED = re.compile(r"^(server-\d+)\s+\|.* (\S+) \((\S+) via (\S+)\) joined")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Stack]:
    with running_stack(COMPOSE_FILE=CLUSTER, CHAT_REPLICA_TIMEOUT="3") as s:
        s.up(3)
        yield s


def joined(stack: Stack) -> dict[str, tuple[str, str]]:
    """nick -> (replica, client address) for every session the replicas logged."""
    found = {}
    for line in stack.logs("server").splitlines():
        if match := JOINED.match(line):
            found[match.group(2)] = (match.group(1), match.group(3))
    return found


def container_ip(name: str) -> str:
    out = subprocess.run(
        [
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


async def until(check: object, timeout: float = 60.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.5)


async def request(p: Peer, frame: dict[str, object]) -> dict[str, object]:
    """Send a request; its reply, whatever live traffic comes in between."""
    ref = uuid.uuid4().hex
    await p.send({**frame, "ref": ref})
    while True:
        reply = await p.recv(10)
        if reply.get("ref") == ref:
            return reply


async def heard(p: Peer, nicks: set[str], timeout: float = 60.0) -> set[str]:
    """The senders heard until all of ``nicks`` were, or ``timeout`` seconds passed."""
    got: set[str] = set()
    deadline = time.monotonic() + timeout
    while not nicks <= got and (left := deadline - time.monotonic()) > 0:
        try:
            frame = await p.recv(min(1.0, left))
        except TimeoutError:
            continue
        if frame["type"] == "msg":
            got.add(str(frame["from"]))
    return got


async def test_three_replicas_behind_haproxy_are_one_chat(cluster: Stack) -> None:
    servers = cluster.containers("server")
    assert len(servers) == 3 and {s["Health"] for s in servers} == {"healthy"}
    assert [c["State"] for c in cluster.containers("haproxy")] == ["running"]
    assert [c["Health"] for c in cluster.containers("postgres")] == ["healthy"]
    await until(lambda: len([n for n in joined(cluster) if n.startswith("client-")]) == 3)
    # leastconn over three replicas: the three demo clients are on three replicas ...
    sessions = {n: where for n, where in joined(cluster).items() if n.startswith("client-")}
    assert len({replica for replica, _ in sessions.values()}) == 3
    # ... and the replicas logged each client's own address, not HAProxy's.
    addresses = {container_ip(str(c["Name"])) for c in cluster.containers("client")}
    assert {address for _, address in sessions.values()} == addresses
    # The host, through the published port, hears every demo client wherever it is.
    nick = "host-" + uuid.uuid4().hex[:6]
    async with peer(cluster.url, nick) as host:
        demo_nicks = {n for n in joined(cluster) if n.startswith("client-")}
        assert await heard(host, demo_nicks) >= demo_nicks
        who = await request(host, {"type": "who"})
        assert demo_nicks | {nick} <= set(who["nicks"])


async def test_metrics_are_not_published_through_haproxy(cluster: Stack) -> None:
    url = f"http://127.0.0.1:{cluster.port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
    assert refused.value.code == 404
    health = await asyncio.to_thread(
        urllib.request.urlopen, f"http://127.0.0.1:{cluster.port}/healthz", timeout=5
    )
    assert health.status == 200


async def test_a_killed_replica_is_left_out_and_its_clients_carry_on(cluster: Stack) -> None:
    async with peer(cluster.url, "watch-" + uuid.uuid4().hex[:6]) as watcher:
        where = joined(cluster)[watcher.welcome["nick"]][0]
        victims = [c for c in cluster.containers("server") if not str(c["Name"]).endswith(where)]
        victim = str(victims[0]["Name"])
        subprocess.run(["docker", "kill", "-s", "KILL", victim], check=True, timeout=60)
        # Every demo client keeps talking, through the surviving replicas.
        before = time.monotonic()
        demo_nicks = {n for n in joined(cluster) if n.startswith("client-")}
        assert await heard(watcher, demo_nicks, timeout=90) >= demo_nicks
        assert time.monotonic() - before < 90
        nicks = (await request(watcher, {"type": "who"}))["nicks"]
        assert sorted(nicks, key=str.lower) == nicks and len(nicks) == len(set(nicks))
    subprocess.run(["docker", "start", victim], check=True, timeout=60)
    cluster.compose("up", "-d", "--wait", "--wait-timeout", "120", "--scale", "client=3")
