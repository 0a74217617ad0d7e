"""chat-chaos: its verdict logic on made-up reports, and a real run on the deployment."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from chaos.__main__ import check
from tests.stack import ROOT

STORED = [(1, "a", "probe p 0"), (2, "b", "other"), (3, "a", "probe p 1"), (4, "b", "x")]


def report(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "nick": "p",
        "sent": 2,
        "acked": 2,
        "received": [1, 2, 3, 4],
        "duplicated": 0,
        "out_of_order": 0,
        "connects": 1,
    }
    return {**base, **changes}


def test_check_passes_a_clean_run() -> None:
    rows, problems = check([report()], STORED, 2)
    assert problems == []
    assert rows[0].ok


@pytest.mark.parametrize(
    "changes",
    [{"received": [1, 3, 4]}, {"duplicated": 1}, {"out_of_order": 1}, {"acked": 1}],
)
def test_check_catches_each_kind_of_failure(changes: dict[str, object]) -> None:
    rows, _ = check([report(**changes)], STORED, 2)
    assert not rows[0].ok


def test_check_catches_a_message_stored_twice_or_not_at_all() -> None:
    _, problems = check([report()], [*STORED, (5, "a", "probe p 1")], 2)
    assert problems == ["'probe p 1' is stored 2 times"]
    _, problems = check([report()], STORED[:2], 2)
    assert problems == ["'probe p 1' is stored 0 times"]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_chaos_run_on_the_deployment_finds_nothing_lost_or_doubled() -> None:
    project = f"chat-chaos-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "CHAT_PUBLISH_PORT": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "chaos", "--clients", "3", "--count", "60"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=800,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "chaos: every acknowledged message stored once" in done.stdout
        assert "kill -9 the server" in done.stdout
        assert "off the network" in done.stdout
    finally:
        subprocess.run(
            ["docker", "compose", "down", "-v", "--timeout", "5"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=120,
        )


CLUSTER_LOAD = ("--clients", "3", "--count", "150", "--interval", "0.2")


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_chaos_run_on_the_cluster_finds_nothing_lost_or_doubled() -> None:
    """kill -9 a replica, restart PostgreSQL, cut a replica off: checked against PostgreSQL.

    Five messages per second per probe for 30 s, so that every fault happens under
    traffic.
    """
    project = f"chat-chaos-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "CHAT_PUBLISH_PORT": "0"}
    cluster = "compose.yaml:compose.cluster.yaml"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "chaos", "--cluster", *CLUSTER_LOAD],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=800,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "chaos: every acknowledged message stored once" in done.stdout
        for fault in ("kill -9", "restart PostgreSQL", "off the network"):
            assert fault in done.stdout
    finally:
        subprocess.run(
            ["docker", "compose", "down", "-v", "--timeout", "5"],
            cwd=ROOT,
            env={**env, "COMPOSE_FILE": cluster},
            capture_output=True,
            timeout=120,
        )
