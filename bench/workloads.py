"""The workloads: each drives a target with the generator's workers and returns figures.

Every figure is a plain number in a dict, so that a run can be saved as JSON and compared
with the baseline measured in the same run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bench.generator import SOURCES, Generator
from bench.procstat import Window, rss_bytes, tcp_counters
from bench.targets import SERVER_CPU, Target, generator_cpus
from bench.worker import BUCKET_NS

#: For the memory workloads: thousands of first-time nicks, each registered by its own
#: fsync'd commit, keep hellos waiting longer than the server's 10-s hello timeout when
#: the disk is slow (seen here: 19,000 took 275 s with other work on the machine, and
#: the server closed hundreds with 1008 "no hello in time", even with a 120-s timeout).
#: Memory is what is measured there, so the timeout is out of the way; the storm keeps
#: every default.
IDLE_ARGS = ("--hello-timeout", "3600")

#: A core this busy (%) is taken as saturated.
SATURATED_PCT = 90.0


@dataclass
class Result:
    workload: str
    target: str
    figures: dict[str, Any]


def merge(histograms: Sequence[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for hist in histograms:
        for bucket, count in hist.items():
            merged[int(bucket)] = merged.get(int(bucket), 0) + count
    return merged


def percentile_ms(hist: dict[int, int], fraction: float) -> float | None:
    """The latency below which ``fraction`` of the samples fall (bucket midpoint)."""
    total = sum(hist.values())
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round((bucket + 0.5) * BUCKET_NS / 1e6, 2)
    return None


def max_ms(hist: dict[int, int]) -> float | None:
    return round((max(hist) + 1) * BUCKET_NS / 1e6, 2) if hist else None


def saturated_side(fig: dict[str, Any]) -> str:
    """Which side's cores were busy: ``server``, ``generator``, ``both`` or ``neither``."""
    server = fig.get(f"core{SERVER_CPU}_busy_pct", 0.0)
    gen = [fig.get(f"core{c}_busy_pct", 0.0) for c in generator_cpus() if c != SERVER_CPU]
    gen_busy = max(gen) if gen else 0.0
    if server >= SATURATED_PCT and gen_busy >= SATURATED_PCT:
        return "both"
    if server >= SATURATED_PCT:
        return "server"
    if gen_busy >= SATURATED_PCT:
        return "generator"
    return "neither"


# --- fan-out and saturation --------------------------------------------------------------


class Room:
    """``clients`` connected to one room of a target, spread over the generator."""

    def __init__(self, gen: Generator, target: Target, clients: int, tag: str) -> None:
        self.gen = gen
        self.target = target
        self.clients = clients
        self.room = f"{tag}room"
        ids = gen.split(range(clients))
        opened = gen.each(
            "open",
            [
                {
                    "url": target.url,
                    "kind": target.kind,
                    "ids": mine,
                    "rooms": [self.room],
                    "tag": tag,
                    "senders": clients,
                }
                for mine in ids
            ],
        )
        failed = sum(o["error_count"] for o in opened)
        if failed:
            raise RuntimeError(f"{failed} clients could not connect: {opened[0]['errors']}")
        time.sleep(0.5)  # let join presence settle

    def step(self, rate: float, seconds: float, size: int = 200) -> dict[str, Any]:
        """Every client sends ``rate`` msg/s for ``seconds``; every client receives all."""
        gen = self.gen
        senders = gen.split(range(self.clients))
        start_at = time.monotonic() + 0.3
        idents = [
            gen.submit(
                w,
                "send",
                kind=self.target.kind,
                senders=mine,
                room=self.room,
                rate=rate * len(mine),
                start_at=start_at,
                seconds=seconds,
                size=size,
            )
            for w, mine in enumerate(senders)
        ]
        window = Window(self.target.pid, [*gen.pids, os.getpid()])
        time.sleep(max(0.0, start_at - time.monotonic()))
        window.start()
        sent: dict[int, tuple[int, int]] = {}
        for w, ident in enumerate(idents):
            sent.update(gen.result(w, ident)["sent"])
        gen.all("drain", expected=sent, wait=10.0)
        cpu = window.stop()
        # Outside the window: the generator's per-mark accounting (bench/wire.py).
        drained = gen.all("tally", expected=sent)
        hist = merge([d["histogram"] for d in drained])
        total_sent = sum(end - first for first, end in sent.values())
        unique = sum(d["unique"] for d in drained)
        fig: dict[str, Any] = {
            "clients": self.clients,
            "rate_per_client": rate,
            "offered_deliveries_per_s": round(rate * self.clients * self.clients),
            "deliveries_per_s": round(unique / seconds),
            "sent": total_sent,
            "expected": total_sent * self.clients,
            "lost": sum(d["missing"] for d in drained),
            "duplicated": sum(d["duplicated"] for d in drained),
            "gaps": sum(d["gaps"] for d in drained),
            "p50_ms": percentile_ms(hist, 0.50),
            "p99_ms": percentile_ms(hist, 0.99),
            "max_ms": max_ms(hist),
            **cpu,
            "server_cpu_us_per_delivery": round(cpu["server_cpu_s"] / max(unique, 1) * 1e6, 2),
            "server_rss_mib": round(rss_bytes(self.target.pid) / 2**20, 1),
        }
        fig["saturated"] = saturated_side(fig)
        return fig

    def close(self) -> None:
        self.gen.all("close")


def fanout(gen: Generator, target: Target, *, clients: int, rate: float, seconds: float) -> Result:
    """``clients`` in one room, each sending ``rate`` messages/s of 200 bytes."""
    room = Room(gen, target, clients, "f")
    try:
        fig = room.step(rate, seconds)
    finally:
        room.close()
    return Result("fanout", target.kind, fig)


STEP_KEYS = (
    "rate_per_client",
    "deliveries_per_s",
    "p50_ms",
    "p99_ms",
    "lost",
    "server_cpu_pct",
    "server_cpu_us_per_delivery",
    "generator_cpu_pct",
    f"core{SERVER_CPU}_busy_pct",
    "others_on_server_core_pct",
    "saturated",
)


def saturation(
    gen: Generator,
    target: Target,
    *,
    clients: int,
    seconds: float,
    rates: Sequence[float],
    limit_ms: float = 50.0,
) -> Result:
    """Raise the rate until p99 passes ``limit_ms`` or anything is lost or doubled."""
    room = Room(gen, target, clients, "s")
    best: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    steps = []
    try:
        for rate in rates:
            fig = room.step(rate, seconds)
            steps.append(
                {k: v for k, v in fig.items() if k in STEP_KEYS or k.endswith("_busy_pct")}
            )
            ok = (
                fig["lost"] == 0
                and fig["duplicated"] == 0
                and fig["gaps"] == 0
                and fig["p99_ms"] is not None
                and fig["p99_ms"] <= limit_ms
            )
            if not ok:
                failed = fig
                break
            best = fig
    finally:
        room.close()
    limit = failed or best or {}
    return Result(
        "saturation",
        target.kind,
        {
            "sustained_deliveries_per_s": best["deliveries_per_s"] if best else 0,
            "at_rate_per_client": best["rate_per_client"] if best else 0,
            "p99_ms": best["p99_ms"] if best else None,
            "server_cpu_pct": best["server_cpu_pct"] if best else None,
            "server_cpu_us_per_delivery": best["server_cpu_us_per_delivery"] if best else None,
            "generator_cpu_pct": best["generator_cpu_pct"] if best else None,
            "limit_reached": failed is not None,
            "saturated_at_limit": limit.get("saturated"),
            "steps": steps,
        },
    )


# --- idle memory -------------------------------------------------------------------------


class Server(Protocol):
    """What the idle workloads need of a server: a :class:`Target`, or a cluster replica
    (:class:`bench.cluster.Replica`)."""

    kind: str

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...


def open_idle(
    gen: Generator,
    servers: Sequence[Server],
    ids: range,
    rooms: list[str],
    tag: str,
    hellos: int | None = None,
) -> tuple[int, list[str]]:
    """Open idle clients ``ids``, client ``i`` on ``servers[i % len(servers)]``, each from
    its process's own source address; returns how many handshakes had to be retried, and
    some of the reasons. The servers are filled at once, side by side.

    Each server gets about 100 handshakes at a time over all processes (asyncio's listen
    backlog, so that no listen queue overflows), and their hellos as they come: one
    server groups the nicks' registrations in its commits. With ``hellos``, at most that
    many clients per server are between their handshake and ``synced``: a replica's
    hello waits for PostgreSQL (several round trips on one of its few connections), and
    thousands waiting at once would run into its query timeout."""
    pending = []
    for w, mine in enumerate(gen.split(ids)):
        for s, server in enumerate(servers):
            pending.append(
                (
                    w,
                    gen.submit(
                        w,
                        "open",
                        url=server.url,
                        kind=server.kind,
                        ids=[i for i in mine if i % len(servers) == s],
                        rooms=rooms,
                        tag=tag,
                        senders=0,
                        sources=[SOURCES[w % len(SOURCES)]],
                        concurrency=max(1, (hellos or 100) // gen.size),
                        gate_hello=hellos is not None,
                        retries=2,
                    ),
                )
            )
    # A cluster registers on the order of a hundred hellos a second here (in all): take
    # an open for stuck only below 20 a second.
    timeout = max(600.0, len(ids) / 20)
    opened = [gen.result(w, ident, timeout) for w, ident in pending]
    failed = sum(o["error_count"] for o in opened)
    if failed:
        errors = [e for o in opened for e in o["errors"]]
        raise RuntimeError(f"{failed} idle clients could not connect: {errors[:3]}")
    return sum(o["retried"] for o in opened), [r for o in opened for r in o["retry_reasons"]]


def idle(
    gen: Generator,
    servers: Sequence[Server],
    *,
    connections: int,
    per_room: int = 100,
    database: Callable[[], dict[str, float]] | None = None,
    hellos: int | None = None,
) -> Result:
    """Many idle connections (each said hello and sits in a room): server memory.

    Reported two ways: RSS growth from a fresh server to ``connections`` open ones,
    divided by their number (which includes one-time growth: allocator arenas, the page
    cache of new nicks), and the marginal cost of the last 80% of them. Each generator
    process connects from its own source address, 127.0.0.x.

    With several ``servers`` (the replicas of a cluster) client ``i`` goes to server
    ``i % len(servers)``, the rooms are shared by all of them, and the figures are also
    given per server; ``database`` reads the shared database's memory (MiB) before and
    after.
    """
    rooms = [f"idle{i}" for i in range(max(1, connections // per_room))]
    first = connections // 5
    count = len(servers)
    # Connections per server: in all, and among the first 20 %.
    mine = [len(range(s, connections, count)) for s in range(count)]
    mine_first = [len(range(s, first, count)) for s in range(count)]
    base = [rss_bytes(s.pid) for s in servers]
    db_before = database() if database else {}
    started = time.monotonic()

    settle = min(2.0, 0.2 + connections / count / 5000)  # for the servers' last writes and frees
    try:
        retried, reasons = open_idle(gen, servers, range(first), rooms, "i", hellos)
        time.sleep(settle)
        partial = [rss_bytes(s.pid) for s in servers]
        more, why = open_idle(gen, servers, range(first, connections), rooms, "i", hellos)
        retried, reasons = retried + more, reasons + why
        open_s = time.monotonic() - started
        time.sleep(settle)
        loaded = [rss_bytes(s.pid) for s in servers]
        db_after = database() if database else {}
        still_open = sum(gen.all("count"))
    finally:
        gen.all("close", wait=30.0)
    figures: dict[str, Any] = {
        "connections": connections,
        "still_open": still_open,
        "generator_processes": gen.size,
        "source_addresses": min(gen.size, len(SOURCES)),
        "open_s": round(open_s, 1),
        "handshakes_retried": retried,
        "retry_reasons": sorted(set(reasons))[:3],
        "rss_before_mib": round(sum(base) / 2**20, 1),
        "rss_after_mib": round(sum(loaded) / 2**20, 1),
        "kib_per_connection": round((sum(loaded) - sum(base)) / connections / 1024, 2),
        "marginal_kib_per_connection": round(
            (sum(loaded) - sum(partial)) / max(1, connections - first) / 1024, 2
        ),
    }
    if count > 1:
        figures["servers"] = count
        figures["per_server"] = [
            {
                "connections": mine[s],
                "rss_before_mib": round(base[s] / 2**20, 1),
                "rss_after_mib": round(loaded[s] / 2**20, 1),
                "marginal_kib_per_connection": round(
                    (loaded[s] - partial[s]) / max(1, mine[s] - mine_first[s]) / 1024, 2
                ),
            }
            for s in range(count)
        ]
    for key, value in db_before.items():
        figures[f"database_{key}_before"] = value
        figures[f"database_{key}_after"] = db_after[key]
    return Result("idle", servers[0].kind, figures)


# --- where an idle connection's bytes go ---------------------------------------------------


def _ask(target: Target, line: str) -> str:
    proc = target.proc
    assert proc is not None
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    answer = proc.stdout.readline().decode()
    if not answer:
        raise RuntimeError(f"memory server exited: {target.log_tail()}")
    return answer


def memory(gen: Generator, *, connections: int, warm: int = 500, settle: float = 3.0) -> Result:
    """tracemalloc of the server (in-process, ``bench.memserver``) around ``connections``
    idle connections opened after ``warm`` others: bytes per connection by allocation
    site, by file, by stack, and live objects per connection by type.

    The second snapshot waits ``settle`` seconds, so that what the opening left pending
    (timers, for one) is gone.
    """
    import json

    target = Target("chat", module="bench.memserver", stdin=True, extra=IDLE_ARGS).start()
    rooms = [f"mem{i}" for i in range(max(1, (warm + connections) // 100))]

    try:
        open_idle(gen, [target], range(warm), rooms, "m")
        time.sleep(1)
        _ask(target, "snapshot a")
        rss_a = rss_bytes(target.pid)
        open_idle(gen, [target], range(warm, warm + connections), rooms, "m")
        time.sleep(settle)
        _ask(target, "snapshot b")
        rss_b = rss_bytes(target.pid)
        fig = json.loads(_ask(target, f"report a b {connections}"))
    finally:
        gen.all("close", wait=30.0)
        target.cleanup()
    fig["rss_kib_per_connection_under_tracemalloc"] = round((rss_b - rss_a) / connections / 1024, 2)
    return Result("memory", "chat", fig)


# --- persistence -------------------------------------------------------------------------


def commit_counts(log: str) -> tuple[int, int] | None:
    """(messages, group commits) from the server's shutdown log line, if it has one."""
    import re

    found = re.findall(r"(\d+) messages in (\d+) group commits", log)
    if not found:
        return None
    messages, commits = found[-1]
    return int(messages), int(commits)


def persistence(
    gen: Generator,
    target: Target,
    *,
    senders: int,
    seconds: float,
    window: int = 64,
    tag: str = "p",
    profile: bool = False,
) -> dict[str, Any]:
    """Acknowledged, stored messages per second from ``senders`` pipelining senders,
    each with ``window`` messages waiting for their ack. (Figures only: the caller
    stops the server and adds what its log says about batches.) With ``profile``, the
    window is also recorded by py-spy (``bench.profile``)."""
    from bench.profile import Profile

    rooms = [f"{tag}{i}" for i in range(senders)]
    ids = gen.split(range(senders))
    opened = gen.each(
        "open",
        [
            {
                "url": target.url,
                "kind": "chat",
                "ids": mine,
                "rooms": rooms,
                "tag": tag,
                "senders": 0,
            }
            for mine in ids
        ],
    )
    if sum(o["error_count"] for o in opened):
        raise RuntimeError(f"persistence clients could not connect: {opened[0]['errors']}")
    rows_before = target.stored_rows()
    cpu = Window(target.pid, [*gen.pids, os.getpid()])
    spy = Profile(target.pid, seconds) if profile else None
    if spy is not None:
        spy.start()
    cpu.start()
    done = gen.each(
        "persist",
        [{"senders": mine, "rooms": rooms, "window": window, "seconds": seconds} for mine in ids],
    )
    figures = cpu.stop()
    profiled = spy.finish() if spy is not None else None
    gen.all("close")
    acked_in_window = sum(d["acked_in_window"] for d in done)
    wall = max(d["wall"] for d in done)
    acked = sum(d["acked_total"] for d in done)
    stored = target.stored_rows() - rows_before
    return {
        "senders": senders,
        "window": window,
        "acked_per_s": round(acked_in_window / wall),
        "acked_total": acked,
        "unacked_at_end": sum(d["unacked"] for d in done),
        "stored_rows": stored,
        "acked_but_not_stored": max(0, acked - stored),
        **figures,
        "server_cpu_us_per_message": round(figures["server_cpu_s"] / max(acked, 1) * 1e6, 1),
        **({"profile": profiled} if profiled is not None else {}),
    }


# --- reconnect storm ---------------------------------------------------------------------


def storm(
    gen: Generator,
    talk: Generator,
    target: Target,
    *,
    clients: int,
    rooms: int,
    backlog: int,
    live_rate: float,
) -> Result:
    """``clients`` in ``rooms`` rooms reconnect at once, with ``resume``, after a restart.

    1. The clients connect and sync; one talker per room sends 5 messages, which they
       all see. Each remembers the highest id it saw.
    2. The clients drop off (a network blip), the talkers send ``backlog`` more messages
       per room, and the server restarts (SIGTERM, same database, same port).
    3. The talkers reconnect and send ``live_rate`` msg/s each; then, at one instant,
       every client reconnects with ``hello`` + ``resume``.

    Figures: time from the storm's start until every client has ``synced``, ``msg``
    frames replayed per second, latency of live messages received during the storm
    (until the last ``synced``), and loss or duplication over replay + live stream,
    checked per client against each talker's numbering.
    """
    names = [f"storm{r}" for r in range(rooms)]
    talker_rooms = {clients + r: names[r] for r in range(rooms)}
    # op_open puts client i in rooms[i % len]: rotate so that talker clients + r gets room r.
    talker_list = [names[(j - clients) % rooms] for j in range(rooms)]
    senders = clients + rooms
    per_worker = gen.split(range(clients))

    def open_clients(**extra: Any) -> list[dict[str, Any]]:
        return [
            {
                "url": target.url,
                "kind": "chat",
                "ids": mine,
                "rooms": names,
                "tag": "u",
                "senders": senders,
                "keep_frames": True,
                "sources": [SOURCES[w % len(SOURCES)]],
                **extra,
            }
            for w, mine in enumerate(per_worker)
        ]

    talkers = {
        "url": target.url,
        "kind": "chat",
        "ids": list(talker_rooms),
        "rooms": talker_list,
        "tag": "t",
        "senders": senders,
        "keep_frames": True,
    }
    opened = gen.each("open", open_clients())
    if sum(o["error_count"] for o in opened):
        raise RuntimeError(f"storm clients could not connect: {opened[0]['errors']}")
    secrets = {k: v for o in opened for k, v in o["secrets"].items()}
    talk_open = talk.call(0, "open", **talkers)
    talk_secrets = talk_open["secrets"]
    warm = talk.call(0, "talk", talkers=talker_rooms, count=5)
    time.sleep(0.3)  # acked means written to every member's socket; let them read it
    highs = {k: v for h in gen.all("highs") for k, v in h.items()}
    talk_highs = talk.call(0, "highs")
    gen.all("close")  # the blip
    talk.call(0, "talk", talkers=talker_rooms, count=backlog)
    talk.all("close")
    target.stop()
    target.start()
    gen.all("reset")
    # The talkers are back first and keep talking, so that live traffic runs through
    # the whole storm.
    talk.call(
        0, "open", **{**talkers, "secrets": talk_secrets, "resume": talk_highs, "concurrency": 0}
    )
    talking = talk.submit(0, "talk", talkers=talker_rooms, rate=live_rate)
    start_at = time.monotonic() + 0.5
    idents = [
        gen.submit(w, "open", **args)
        for w, args in enumerate(
            open_clients(
                concurrency=0,
                secrets=secrets,
                resume=highs,
                last_seq=warm["last_seq"],
                start_at=start_at,
                report=True,
            )
        )
    ]
    window = Window(target.pid, [*gen.pids, *talk.pids, os.getpid()])
    time.sleep(max(0.0, start_at - time.monotonic()))
    window.start()
    tcp_before = tcp_counters()
    results = [gen.result(w, ident) for w, ident in enumerate(idents)]
    cpu = window.stop()
    tcp = {k: v - tcp_before[k] for k, v in tcp_counters().items()}
    time.sleep(0.5)  # live traffic after the storm, to check the stream goes on
    talk.call(0, "stop_talk")
    final = talk.result(0, talking)
    time.sleep(0.3)
    per_nick = {k: v for r in results for k, v in r["per_nick"].items()}
    errors = sum(r["error_count"] for r in results)
    synced = sorted(at for _, at, _ in per_nick.values())
    all_synced = (synced[-1] - start_at) if synced else float("nan")
    replayed = sum(n for _, _, n in per_nick.values())
    figures = gen.all(
        "storm_figures",
        cutoff=int(synced[-1] * 1e9) if synced else 0,
        expected=final["last_seq"],
        talker_rooms=talker_rooms,
    )
    gen.all("close")
    talk.all("close")
    hist = merge([f["histogram"] for f in figures])
    return Result(
        "storm",
        "chat",
        {
            "clients": clients,
            "rooms": rooms,
            "backlog_per_room": backlog,
            "live_msgs_per_s_per_room": live_rate,
            "reconnect_errors": errors,
            "errors": [e for r in results for e in r["errors"]][:3],
            "all_synced_s": round(all_synced, 3),
            "half_synced_s": round(synced[len(synced) // 2] - start_at, 3) if synced else None,
            "replayed_msgs": replayed,
            "replayed_per_s": round(replayed / all_synced) if synced else 0,
            "live_frames_in_storm": sum(f["live_frames"] for f in figures),
            "live_p50_ms": percentile_ms(hist, 0.50),
            "live_p99_ms": percentile_ms(hist, 0.99),
            "live_max_ms": max_ms(hist),
            "lost": sum(f["missing"] for f in figures),
            "duplicated": sum(f["duplicated"] for f in figures),
            "gaps": sum(f["gaps"] for f in figures),
            **{k: v for k, v in cpu.items() if k != "server_cpu_s"},
            "listen_queue_overflows": tcp["ListenOverflows"],
            "syn_retransmits": tcp["TCPSynRetrans"],
        },
    )
