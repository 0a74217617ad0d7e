"""``chat-chaos``: break the compose deployment while clients chat, then prove nothing was lost.

Starts probe clients in containers on the compose network (``chat-client --probe``), each
sending numbered messages. Along the way it kills the server with SIGKILL and starts it
again, cuts one probe container off the network for longer than the keepalive timeout and
plugs it back, and restarts the server once more. When every probe has reported, it
prints a table per client (sent, acknowledged, received, missing, duplicated, out of
order, and a checksum of what it received against the same stretch of the database) and
checks that every acknowledged message is stored exactly once. All zeros and matching
checksums: exit 0. Anything else: exit 1.

Run it from the project folder, with the deployment up or not:
``chat-chaos`` (or ``python -m chaos``). It uses the compose project of the folder, or
``COMPOSE_PROJECT_NAME``.

``chat-chaos --cluster`` does the same to the cluster deployment (compose.yaml +
compose.cluster.yaml: replicas behind HAProxy on PostgreSQL): the probes connect through
HAProxy; it kills one replica with SIGKILL (and starts it again), restarts PostgreSQL,
and cuts one replica off the network for longer than the replica timeout; the table is
checked against PostgreSQL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PING = 2  # keepalive interval and timeout during the run, seconds


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(*args: str, check: bool = True, timeout: float = 300) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr}")
    return done.stdout


def compose(*args: str, check: bool = True, timeout: float = 300) -> str:
    return run("docker", "compose", *args, check=check, timeout=timeout)


def project() -> str:
    config = json.loads(compose("config", "--format", "json"))
    return str(config["name"])


@dataclass
class Row:
    nick: str
    sent: int
    acked: int
    received: int
    missing: int
    duplicated: int
    out_of_order: int
    checksum: str
    expected: str

    @property
    def ok(self) -> bool:
        return (
            self.acked == self.sent
            and self.missing == 0
            and self.duplicated == 0
            and self.out_of_order == 0
            and self.checksum == self.expected
        )


def digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:12]


#: The cluster deployment, and its replica timeout during a run (seconds).
CLUSTER_FILES = "compose.yaml:compose.cluster.yaml"
REPLICA_TIMEOUT = 3


def stored_lobby_postgres() -> list[tuple[int, str, str]]:
    sql = (
        "SELECT COALESCE(json_agg(json_build_array(id, sender, convert_from(body, 'UTF8'))"
        " ORDER BY id), '[]') FROM messages WHERE room = 'lobby'"
    )
    out = compose("exec", "-T", "postgres", "psql", "-U", "chat", "-d", "chat", "-At", "-c", sql)
    return [tuple(row) for row in json.loads(out)]


def cluster_faults(network: str) -> None:
    """Kill -9 a replica, restart PostgreSQL, cut a replica off: the cluster's faults."""
    replicas = sorted(
        json.loads(line)["Name"]
        for line in compose("ps", "--format", "json", "server").splitlines()
        if line.strip()
    )
    say(f"kill -9 {replicas[0]} (of {len(replicas)} replicas)")
    run("docker", "kill", "-s", "KILL", replicas[0])
    time.sleep(REPLICA_TIMEOUT + 3)
    run("docker", "start", replicas[0])
    say(f"{replicas[0]} started again; restart PostgreSQL")
    compose("restart", "postgres")
    time.sleep(3)
    victim = replicas[-1]
    say(f"cut {victim} off the network for {REPLICA_TIMEOUT + 5}s")
    run("docker", "network", "disconnect", network, victim)
    time.sleep(REPLICA_TIMEOUT + 5)
    run("docker", "network", "connect", network, victim)
    say(f"{victim} plugged back")
    compose("up", "-d", "--wait", "server")


def stored_lobby() -> list[tuple[int, str, str]]:
    code = (
        "import json, sqlite3; db = sqlite3.connect('/data/chat.db'); "
        'print(json.dumps(db.execute("SELECT id, sender, body FROM messages '
        "WHERE room = 'lobby' ORDER BY id\").fetchall()))"
    )
    return [tuple(row) for row in json.loads(compose("exec", "-T", "server", "python", "-c", code))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="chat-chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4, help="probe clients (default 4)")
    parser.add_argument("--count", type=int, default=100, help="messages per probe (100)")
    parser.add_argument("--interval", type=float, default=0.15, help="seconds between them")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="the cluster deployment (compose.cluster.yaml): replicas, HAProxy, PostgreSQL",
    )
    args = parser.parse_args(argv)

    os.environ["CHAT_PING_INTERVAL"] = str(PING)
    os.environ["CHAT_PING_TIMEOUT"] = str(PING)
    if args.cluster:
        os.environ["COMPOSE_FILE"] = CLUSTER_FILES
        os.environ["CHAT_REPLICA_TIMEOUT"] = str(REPLICA_TIMEOUT)
    name = project()
    network = f"{name}_chat"
    run_id = uuid.uuid4().hex[:4]
    what = "the replicas, HAProxy and PostgreSQL" if args.cluster else "the server"
    say(f"project {name}: starting {what} (keepalive {PING}s + {PING}s)")
    compose("build", timeout=900)
    compose("up", "-d", "--wait", "server", *(["haproxy"] if args.cluster else []))
    probes = [f"{name}-probe-{run_id}-{i}" for i in range(args.clients)]
    for i, container in enumerate(probes):
        compose(
            "run",
            "-d",
            "--no-deps",
            "--name",
            container,
            "client",
            "--nick",
            f"probe-{run_id}-{i}",
            "--probe",
            str(args.count),
            "--probe-interval",
            str(args.interval),
            "--ping-interval",
            str(PING),
            "--ping-timeout",
            str(PING),
        )
    say(f"{len(probes)} probes sending {args.count} numbered messages each")
    try:
        time.sleep(3)
        if args.cluster:
            cluster_faults(network)
        else:
            single_server_faults(network, probes)
        say("waiting for every probe to report")
        for container in probes:
            run("docker", "wait", container, timeout=600)
        reports = []
        for container in probes:
            lines = [
                ln
                for ln in run("docker", "logs", container).splitlines()
                if ln.startswith("PROBE-REPORT ")
            ]
            if not lines:
                raise SystemExit(
                    f"{container} gave no report:\n" + run("docker", "logs", container)
                )
            reports.append(json.loads(lines[-1].removeprefix("PROBE-REPORT ")))
        stored = stored_lobby_postgres() if args.cluster else stored_lobby()
        rows, problems = check(reports, stored, args.count)
    finally:
        for container in probes:
            run("docker", "rm", "-f", container, check=False)
    print_table(rows)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems or not all(row.ok for row in rows):
        print("chaos: FAILED")
        sys.exit(1)
    print(
        "chaos: every acknowledged message stored once; every client received every "
        "message once, in order"
    )


def single_server_faults(network: str, probes: list[str]) -> None:
    say("kill -9 the server")
    compose("kill", "-s", "SIGKILL", "server")
    time.sleep(1)
    compose("up", "-d", "--wait", "server")
    say("server back")
    time.sleep(2)
    say(f"cut {probes[0]} off the network for {3 * PING + 2}s")
    run("docker", "network", "disconnect", network, probes[0])
    time.sleep(3 * PING + 2)
    run("docker", "network", "connect", network, probes[0])
    say("plugged back; restart the server")
    compose("restart", "server")


def check(
    reports: list[dict[str, Any]], stored: list[tuple[int, str, str]], count: int
) -> tuple[list[Row], list[str]]:
    problems = []
    ids = [row[0] for row in stored]
    bodies = Counter(row[2] for row in stored)
    rows = []
    for report in reports:
        nick = report["nick"]
        for n in range(count):
            copies = bodies[f"probe {nick} {n}"]
            if copies != 1:
                problems.append(f"'probe {nick} {n}' is stored {copies} times")
        received: list[int] = report["received"]
        if received:
            low, high = received[0], max(received)
            expected = [i for i in ids if low <= i <= high]
        else:
            expected = []
        rows.append(
            Row(
                nick=nick,
                sent=report["sent"],
                acked=report["acked"],
                received=len(received),
                missing=len(set(expected) - set(received)),
                duplicated=report["duplicated"],
                out_of_order=report["out_of_order"],
                checksum=digest(received),
                expected=digest(expected),
            )
        )
    return rows, problems


def print_table(rows: list[Row]) -> None:
    head = (
        "client",
        "sent",
        "acked",
        "received",
        "missing",
        "duplicated",
        "out of order",
        "checksum",
        "database",
    )
    print("  ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = (
            r.nick,
            r.sent,
            r.acked,
            r.received,
            r.missing,
            r.duplicated,
            r.out_of_order,
            r.checksum,
            r.expected,
        )
        print("  ".join(f"{c!s:>12}" for c in cells))


if __name__ == "__main__":
    main()
