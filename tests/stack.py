"""The compose deployment under its own project name and host port, for the tests.

The stack is built and started from this checkout's compose.yaml, exactly as users run it,
and removed with its volumes afterwards.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    """A port free on every address, below the kernel's ephemeral range.

    A port the kernel handed out (bind to 0) is ephemeral: by the time Docker's proxy binds
    it, any outgoing connection on this machine (another test's clients, a benchmark) may
    be using it, and ``docker compose up`` fails with "address already in use".
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
        ephemeral = int(file.read().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, ephemeral)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000-{ephemeral}")


@dataclass
class Stack:
    project: str
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        done = subprocess.run(
            ["docker", "compose", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def up(self, clients: int) -> None:
        self.compose("up", "-d", "--scale", f"client={clients}", "--wait", "--wait-timeout", "120")

    def containers(self, *services: str) -> list[dict[str, object]]:
        out = self.compose("ps", "-a", "--format", "json", *services)
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda r: str(r["Name"]))

    def image(self, service: str) -> str:
        """The image compose built for a service: named after the project, never shared."""
        return f"{self.project}-{service}"

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service).replace("\r", "")


@contextmanager
def running_stack(**extra_env: str) -> Iterator[Stack]:
    """A fresh project (own name, own host port); removed with its volumes afterwards."""
    project = f"chat-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "CHAT_PUBLISH_PORT": str(free_port()),
        "CHAT_DEMO_INTERVAL": "2",
        **extra_env,
    }
    s = Stack(project, int(env["CHAT_PUBLISH_PORT"]), env)
    s.compose("--profile", "chat", "build", timeout=900)
    try:
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", "--timeout", "15", check=False)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as s:
        yield s
