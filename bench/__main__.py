"""``chat-bench`` / ``python -m bench``: compose-chat against the bare relay, in one run.

Workloads (``--workloads``, comma-separated; all by default):

  fanout       100 clients in one room, 5 msg/s each: CPU per delivery, latency
  saturation   raise the rate until p99 > 50 ms or anything is lost; who saturated
  idle         many idle connections: server RSS per connection; with --replicas K, held
               by K replicas on PostgreSQL (a container) where one process cannot hold
               them all, the relay and the SQLite server measured at one replica's share
  memory       tracemalloc of the server: an idle connection's bytes by site and type
  persistence  acknowledged messages/s, the storage-only limit, a profile of the server
  storm        clients reconnect at once with resume after a restart

Figures are ratios to the relay measured in the same run: absolute numbers drift on a
shared machine. The server runs on CPU 0; the generator's processes on the other cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from bench.cluster import Postgres, Replica, start_replica
from bench.generator import SOURCES, Generator
from bench.procstat import load_average
from bench.targets import (
    CHAT_ARGS,
    SERVER_CPU,
    Target,
    generator_cpus,
    pin,
    raise_nofile,
)
from bench.workloads import (
    IDLE_ARGS,
    Result,
    commit_counts,
    fanout,
    idle,
    memory,
    persistence,
    saturation,
    storm,
)

WORKLOADS = ("fanout", "saturation", "idle", "memory", "persistence", "storm")
#: Others' share of the server's core (%) above which a figure is flagged as noisy.
NOISY_PCT = 15.0
#: Connections one process (server or generator) may hold, below its open-files limit.
FD_MARGIN = 300


def machine() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        loop = f", uvloop {version('uvloop')}"
    except PackageNotFoundError:
        loop = ", no uvloop"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"websockets {version('websockets')}{loop}"
    )


def reference() -> float:
    """``bench.reference`` on the server's core, in its own process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.reference"], stdout=subprocess.PIPE, text=True
    )
    pin(proc.pid, [SERVER_CPU])
    out, _ = proc.communicate(timeout=120)
    if proc.returncode:
        raise RuntimeError(f"bench.reference exited with {proc.returncode}")
    return float(out)


def storage_only(batches: Sequence[int], seconds: float) -> dict[str, Any]:
    """``bench.storage`` in its own process, on the server's core."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.storage",
            "--seconds",
            str(seconds),
            "--batches",
            ",".join(str(b) for b in batches),
        ],
        stdout=subprocess.PIPE,
    )
    pin(proc.pid, [SERVER_CPU])
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError("bench.storage failed")
    result: dict[str, Any] = json.loads(out)
    return result


def guarded(gen: Generator, workload: str, kind: str, measure: Callable[[], Result]) -> Result:
    """Run one workload; a failure is reported as its result and the run goes on."""
    started = time.monotonic()
    try:
        result = measure()
    except Exception as exc:
        traceback.print_exc()
        with contextlib.suppress(Exception):
            gen.all("close", wait=5.0)
        result = Result(workload, kind, {"error": f"{type(exc).__name__}: {exc}"})
    print(f"done: {workload} {kind} ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return result


def throughput_workers(workers: int) -> int:
    """Generator processes for fan-out and saturation: at most one per generator core.
    Two on one core take turns, and each turn is latency added to every frame waiting in
    the other's sockets (2 cores, 400k deliveries/s: p99 117 ms with two, 33 ms with one)."""
    return max(1, min(workers, len(generator_cpus())))


def throughput(gen: Generator, args: argparse.Namespace) -> list[Result]:
    """Fan-out and saturation, against the relay and then compose-chat."""
    results: list[Result] = []
    chosen = args.workloads
    for kind in ("relay", "chat"):
        target = Target(kind).start()
        try:
            if "fanout" in chosen:
                results.append(
                    guarded(
                        gen,
                        "fanout",
                        kind,
                        partial(
                            fanout,
                            gen,
                            target,
                            clients=args.clients,
                            rate=args.rate,
                            seconds=args.seconds,
                        ),
                    )
                )
            if "saturation" in chosen:
                results.append(
                    guarded(
                        gen,
                        "saturation",
                        kind,
                        partial(
                            saturation,
                            gen,
                            target,
                            clients=args.clients,
                            seconds=args.step_seconds or args.seconds,
                            rates=args.rates,
                        ),
                    )
                )
        finally:
            target.cleanup()
    return results


def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    chosen = args.workloads
    if {"fanout", "saturation"} & set(chosen):
        with Generator(throughput_workers(args.workers)) as gen:
            results.extend(throughput(gen, args))
    with Generator(args.workers) as gen:
        if "persistence" in chosen:
            results.append(guarded(gen, "persistence", "chat", lambda: persistence_run(gen, args)))
        if "storm" in chosen:
            results.append(guarded(gen, "storm", "chat", lambda: storm_run(gen, args)))
        if "idle" in chosen or "memory" in chosen:
            count = args.idle if "idle" in chosen else args.memory
            if math.ceil(count / args.per_process) <= gen.size:
                results.extend(idle_and_memory(gen, args))
            else:
                with Generator(math.ceil(count / args.per_process)) as many:
                    results.extend(idle_and_memory(many, args))
    return results


def storm_run(gen: Generator, args: argparse.Namespace) -> Result:
    with Generator(1) as talk:
        target = Target("chat").start()
        try:
            return storm(
                gen,
                talk,
                target,
                clients=args.storm_clients,
                rooms=args.storm_rooms,
                backlog=args.storm_backlog,
                live_rate=args.storm_live,
            )
        finally:
            target.cleanup()


def idle_one(gen: Generator, kind: str, connections: int) -> Result:
    target = Target(kind, extra=IDLE_ARGS).start()  # fresh: its memory is the idle one's
    try:
        return idle(gen, [target], connections=connections)
    finally:
        target.cleanup()


def idle_cluster(gen: Generator, args: argparse.Namespace) -> Result:
    """``--idle`` connections over ``--replicas`` fresh replicas on one PostgreSQL (in a
    container), each with the single server's flags. Memory is measured here, not CPU:
    the replicas are not pinned to the server's core, so that registering many thousands
    of hellos, each of which every replica hears of, takes both cores."""
    settings = [f"max_connections={20 * args.replicas + 40}", *args.postgres_settings]
    pg = Postgres(args.postgres_image, *settings, host_network=True)
    replicas: list[Replica] = []
    try:
        url = asyncio.run(pg.database())
        for _ in range(args.replicas):
            replicas.append(start_replica(url, *CHAT_ARGS, *IDLE_ARGS))
        result = idle(gen, replicas, connections=args.idle, database=pg.memory, hellos=args.hellos)
    finally:
        for replica in replicas:
            replica.stop()
        pg.close()
    return Result("idle", "cluster", result.figures)


def idle_and_memory(gen: Generator, args: argparse.Namespace) -> list[Result]:
    results = []
    if "idle" in args.workloads:
        # With replicas, the baselines hold what one replica holds.
        single = math.ceil(args.idle / args.replicas)
        for kind in ("relay", "chat"):
            results.append(guarded(gen, "idle", kind, partial(idle_one, gen, kind, single)))
        if args.replicas > 1:
            results.append(guarded(gen, "idle", "cluster", partial(idle_cluster, gen, args)))
    if "memory" in args.workloads:
        warm = min(500, args.memory)
        results.append(
            guarded(
                gen,
                "memory",
                "chat",
                lambda: memory(gen, connections=args.memory, warm=warm, settle=args.memory_settle),
            )
        )
    return results


def persistence_run(gen: Generator, args: argparse.Namespace) -> Result:
    """Acked messages/s on a server of its own (its log's commit count is this run's), a
    profiled run on another, then the storage-only limit at the batch size seen."""
    target = Target("chat", log_level="INFO").start()
    try:
        fig = persistence(gen, target, senders=args.senders, seconds=args.seconds)
        target.stop()
    finally:
        target.cleanup()
    counts = commit_counts(target.logs[-1]) if target.logs else None
    fig["mean_batch"] = round(counts[0] / max(counts[1], 1), 1) if counts else None
    if fig["mean_batch"]:
        # One commit cycle: from one group commit's start to the next one's.
        fig["commit_cycle_ms"] = round(fig["mean_batch"] / max(fig["acked_per_s"], 1) * 1000, 2)
    batches = sorted({max(1, round(fig["mean_batch"] or 64)), 512})
    fig["storage_only"] = storage_only(batches, args.storage_seconds)
    if args.profile:
        target = Target("chat").start()
        try:
            profiled = persistence(
                gen, target, senders=args.senders, seconds=args.seconds, profile=True
            )
        finally:
            target.cleanup()
        fig["profile"] = profiled.get("profile")
        fig["profiled_acked_per_s"] = profiled["acked_per_s"]
    return Result("persistence", "chat", fig)


# --- the report ------------------------------------------------------------------------------


def _fmt(fig: dict[str, Any], skip: Sequence[str] = ()) -> str:
    return "  ".join(
        f"{k}={v}" for k, v in fig.items() if k not in skip and not isinstance(v, (dict, list))
    )


def report(results: list[Result], load: dict[str, Any]) -> str:
    failed = [r for r in results if "error" in r.figures]
    by = {(r.workload, r.target): r.figures for r in results if r not in failed}
    lines = [
        f"machine: {machine()}",
        f"load average before/after: {load['before']} / {load['after']}",
        f"the server's core today: {load['reference_us']} µs per reference round "
        "(python -m bench.reference; lower is faster, compare runs only where it agrees)",
    ]
    for workload in WORKLOADS:
        for kind in ("relay", "chat"):
            fig = by.get((workload, kind))
            if fig is None:
                continue
            lines.append(f"{workload:<12} {kind:<6} {_fmt(fig)}")
            for step in fig.get("steps", []):
                lines.append(f"{'':<19}  step {_fmt(step)}")
    lines.append("")
    for result in failed:
        lines.append(f"FAILED: {result.workload} {result.target}: {result.figures['error']}")
    for (workload, kind), fig in by.items():
        windows = [fig, *fig.get("steps", [])]
        others = max((w.get("others_on_server_core_pct", 0.0) for w in windows), default=0.0)
        if others > NOISY_PCT:
            lines.append(
                f"WARNING: {workload} {kind}: other processes took up to {others}% of the "
                "server's core: the machine was not quiet, these figures measured it too"
            )
        steal = max((w.get("host_steal_pct", 0.0) for w in windows), default=0.0)
        if steal > NOISY_PCT:
            lines.append(
                f"WARNING: {workload} {kind}: the host took {steal}% of this machine's CPU "
                "time (steal): these figures measured a busy host too"
            )
    f_chat, f_base = by.get(("fanout", "chat")), by.get(("fanout", "relay"))
    if f_chat and f_base:
        # CPU time comes in clock ticks (procstat): a short run may see a whole side use
        # less than one, and then there is no ratio to give.
        if f_base["server_cpu_us_per_delivery"]:
            ratio = f_chat["server_cpu_us_per_delivery"] / f_base["server_cpu_us_per_delivery"]
            verdict = f"{ratio:.2f}x (target <= 0.6x)"
        else:
            verdict = "n/a (the relay used less than one clock tick of CPU: run longer)"
        lines.append(
            f"fanout: server CPU per delivery chat/relay = {verdict}: "
            f"chat {f_chat['server_cpu_us_per_delivery']} us, relay "
            f"{f_base['server_cpu_us_per_delivery']} us; p99 chat {f_chat['p99_ms']} ms, relay "
            f"{f_base['p99_ms']} ms; lost chat {f_chat['lost']}, relay {f_base['lost']}"
        )
    s_chat, s_base = by.get(("saturation", "chat")), by.get(("saturation", "relay"))
    for kind, fig in (("relay", s_base), ("chat", s_chat)):
        if fig:
            steps = fig["steps"]
            last = steps[-1] if steps else {}
            cores = "  ".join(f"{k}={v}" for k, v in last.items() if k.endswith("_busy_pct"))
            verdict = (
                f"limit reached at {last.get('rate_per_client')} msg/s per client: "
                f"{last.get('saturated')} saturated ({cores}, server process "
                f"{last.get('server_cpu_pct')}%, generator processes "
                f"{last.get('generator_cpu_pct')}%)"
                if fig["limit_reached"]
                else "limit NOT reached: add higher --rates"
            )
            lines.append(
                f"saturation {kind}: {fig['sustained_deliveries_per_s']} deliveries/s at p99 "
                f"{fig['p99_ms']} ms, server {fig['server_cpu_us_per_delivery']} CPU-us per "
                f"delivery; {verdict}"
            )
    if s_chat and s_base and s_base["sustained_deliveries_per_s"]:
        ratio = s_chat["sustained_deliveries_per_s"] / s_base["sustained_deliveries_per_s"]
        lines.append(f"saturation deliveries/s chat/relay = {ratio:.2f}x")
    i_chat, i_base = by.get(("idle", "chat")), by.get(("idle", "relay"))
    i_cluster = by.get(("idle", "cluster"))
    if i_cluster:
        lines.append(idle_cluster_report(i_cluster, i_chat, i_base))
    if i_chat and i_base:
        lines.append(
            f"idle: {i_chat['connections']} connections, marginal KiB/connection chat "
            f"{i_chat['marginal_kib_per_connection']} vs relay "
            f"{i_base['marginal_kib_per_connection']} = "
            f"{i_chat['marginal_kib_per_connection'] / i_base['marginal_kib_per_connection']:.2f}x "
            f"(target <= 0.5x); RSS chat {i_chat['rss_after_mib']} MiB, relay "
            f"{i_base['rss_after_mib']} MiB"
        )
    mem = by.get(("memory", "chat"))
    if mem:
        lines.append(
            f"memory (tracemalloc, {mem['connections']} connections): "
            f"{mem['traced_bytes_per_connection']} traced bytes per connection; top sites:"
        )
        for site in mem["sites"][:12]:
            lines.append(
                f"  {site['bytes_per_connection']:>8} B  "
                f"{site['blocks_per_connection']:>5} blocks  {site['site']}  {site['code']}"
            )
        lines.append("  live objects per connection by type (gc-tracked):")
        for kind in mem["gc_types"][:12]:
            lines.append(f"  {kind['objects_per_connection']:>6} x {kind['type']}")
    p_chat = by.get(("persistence", "chat"))
    if p_chat:
        lines.append(
            f"persistence: {p_chat['acked_per_s']} acked msgs/s (target >= 60000), mean batch "
            f"{p_chat['mean_batch']}, commit cycle {p_chat.get('commit_cycle_ms')} ms, "
            f"acked but not stored: {p_chat['acked_but_not_stored']}"
        )
        for row in p_chat["storage_only"]["results"]:
            lines.append(
                f"  storage only ({row['way']}, batch {row['batch']}): {row['rows_per_s']} rows/s, "
                f"{row['ms_per_commit']} ms per commit"
            )
        prof = p_chat.get("profile")
        if prof and "threads" in prof:
            lines.append(
                f"  profile of the server (py-spy, {prof['wall_s']} s, profiled run "
                f"{p_chat.get('profiled_acked_per_s')} acked/s):"
            )
            for thread in prof["threads"]:
                shares = ", ".join(f"{k} {v}%" for k, v in thread["share_pct"].items())
                lines.append(f"    {thread['thread']} (CPU {thread['cpu_pct']}%): {shares}")
        elif prof:
            lines.append(f"  profile: {prof.get('error')}")
    st = by.get(("storm", "chat"))
    if st:
        lines.append(
            f"storm: {st['clients']} clients in {st['rooms']} rooms all synced in "
            f"{st['all_synced_s']} s (target <= 3 s), half in {st['half_synced_s']} s; "
            f"{st['replayed_per_s']} msgs replayed/s; live p99 {st['live_p99_ms']} ms; "
            f"lost {st['lost']}, duplicated {st['duplicated']}, errors {st['reconnect_errors']}; "
            f"listen queue overflows {st['listen_queue_overflows']}, SYN retransmits "
            f"{st['syn_retransmits']} (machine-wide counters)"
        )
    return "\n".join(lines)


def idle_cluster_report(
    fig: dict[str, Any], single: dict[str, Any] | None, relay: dict[str, Any] | None
) -> str:
    per = fig.get("per_server", [])
    marginal = [s["marginal_kib_per_connection"] for s in per]
    lines = [
        f"idle cluster: {fig['still_open']} of {fig['connections']} connections still open "
        f"on {fig.get('servers', 1)} replicas on PostgreSQL, from {fig['generator_processes']} "
        f"generator processes and {fig['source_addresses']} source addresses, opened in "
        f"{fig['open_s']} s; RSS of all replicas {fig['rss_before_mib']} -> "
        f"{fig['rss_after_mib']} MiB"
    ]
    for n, s in enumerate(per):
        lines.append(
            f"  replica {n}: {s['connections']} connections, RSS {s['rss_before_mib']} -> "
            f"{s['rss_after_mib']} MiB, marginal {s['marginal_kib_per_connection']} KiB/connection"
        )
    if marginal:
        mean = sum(marginal) / len(marginal)
        against = []
        for name, other in (("SQLite server", single), ("relay", relay)):
            if other and (theirs := other["marginal_kib_per_connection"]):
                against.append(f"{name} {theirs} (replica/{name}: {mean / theirs:.2f}x)")
        count = (single or relay or {}).get("connections")
        lines.append(
            f"  marginal KiB/connection per replica: mean {mean:.2f}, against one process "
            f"holding {count} in the same run: {', '.join(against) or 'n/a'}"
        )
    database = [k[len("database_") : -len("_before")] for k in fig if k.endswith("_before")]
    if database:
        lines.append(
            "  PostgreSQL (its container): "
            + ", ".join(
                f"{k} {fig[f'database_{k}_before']} -> {fig[f'database_{k}_after']} MiB"
                for k in database
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="chat-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--clients", type=int, default=100, help="clients in the fan-out room")
    parser.add_argument("--rate", type=float, default=5.0, help="msg/s per client (fan-out)")
    parser.add_argument(
        "--rates",
        default="2,5,10,15,20,30,40,50,60",
        help="msg/s per client, the saturation steps",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument(
        "--step-seconds", type=float, default=5.0, help="length of a saturation step"
    )
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections")
    parser.add_argument(
        "--per-process", type=int, default=15_000, help="most idle connections per generator"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="idle: above 1, the --idle connections are held by this many replicas on "
        "PostgreSQL (a container of $POSTGRES_IMAGE), and the relay and the SQLite server "
        "are measured holding one replica's share",
    )
    parser.add_argument("--postgres-image", default=os.environ.get("POSTGRES_IMAGE", "postgres:17"))
    parser.add_argument(
        "--postgres-settings",
        type=lambda text: [s for s in text.split(",") if s],
        default=[],
        help="idle with --replicas: PostgreSQL settings (name=value,...) for its container",
    )
    parser.add_argument(
        "--hellos",
        type=int,
        default=16,
        help="idle with --replicas: most hellos waiting for synced per replica (16)",
    )
    parser.add_argument("--memory", type=int, default=3000, help="connections under tracemalloc")
    parser.add_argument(
        "--memory-settle",
        type=float,
        default=3.0,
        help="seconds between the last connection and the memory snapshot",
    )
    parser.add_argument("--senders", type=int, default=50, help="senders (persistence)")
    parser.add_argument("--storage-seconds", type=float, default=3.0, help="per storage-only case")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip py-spy")
    parser.add_argument("--storm-clients", type=int, default=2000)
    parser.add_argument("--storm-rooms", type=int, default=20)
    parser.add_argument("--storm-backlog", type=int, default=50, help="messages missed per room")
    parser.add_argument("--storm-live", type=float, default=5.0, help="live msg/s per room")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--plot", help="also draw the saturation curves to this PNG (matplotlib)")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    limit = raise_nofile()
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if "idle" in args.workloads and math.ceil(args.idle / args.replicas) + FD_MARGIN > limit:
        most = limit - FD_MARGIN
        parser.error(
            f"a server process may hold {limit} open files here (the hard limit, "
            f"RLIMIT_NOFILE), so at most {most} idle connections each: pass --idle {most}, "
            f"or spread them over replicas on PostgreSQL with --replicas "
            f"{math.ceil(args.idle / most)} or more (needs Docker and $POSTGRES_IMAGE), or "
            "raise the hard limit (ulimit -Hn, as root)"
        )
    if args.per_process + FD_MARGIN > limit:
        args.per_process = limit - FD_MARGIN
    if len(SOURCES) * 28_000 < args.idle:
        parser.error(
            f"at most {len(SOURCES) * 28_000} idle connections from {len(SOURCES)} addresses"
        )
    if args.plot:
        from bench.plot import check

        check()
    if not pin(0, generator_cpus()) or SERVER_CPU in generator_cpus():
        print("note: one CPU only: generator and server share it", file=sys.stderr)
    load: dict[str, Any] = {"before": load_average(), "reference_us": reference()}
    started = time.monotonic()
    results = run(args)
    load["after"] = load_average()
    load["minutes"] = round((time.monotonic() - started) / 60, 1)
    if args.json:  # first: the figures are kept even if the report fails
        data = {
            "machine": machine(),
            "load_average": load,
            "command": "chat-bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "results": [vars(r) for r in results],
        }
        with open(args.json, "w") as file:
            json.dump(data, file, indent=1)
    print(report(results, load))
    if args.plot:
        from bench.plot import draw

        draw([vars(r) for r in results], args.plot, machine())
    if any("error" in r.figures for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
