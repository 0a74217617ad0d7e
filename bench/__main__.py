"""``chat-bench`` / ``python -m bench``: run the workloads against compose-chat and the
baseline relay in the same run, print figures and ratios, optionally save JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from bench.load import (
    GENERATOR_CPU,
    Result,
    Target,
    fanout,
    idle,
    persistence,
    pin,
    raise_nofile,
    saturation,
)

WORKLOADS = ("fanout", "saturation", "idle", "persistence")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


async def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    rates = [float(r) for r in args.rates.split(",")]
    for kind in ("relay", "chat"):
        target = Target(kind).start()
        try:
            if "fanout" in args.workloads:
                results.append(
                    await fanout(target, clients=args.clients, rate=args.rate, seconds=args.seconds)
                )
            if "saturation" in args.workloads:
                results.append(
                    await saturation(
                        target, clients=args.clients, seconds=args.seconds, rates=rates
                    )
                )
            if "persistence" in args.workloads and kind == "chat":
                results.append(
                    await persistence(target, senders=args.senders, seconds=args.seconds)
                )
        finally:
            target.stop()
        if "idle" in args.workloads:  # a fresh server, so its memory is the idle one's
            target = Target(kind).start()
            try:
                results.append(await idle(target, connections=args.idle))
            finally:
                target.stop()
    return results


def report(results: list[Result]) -> str:
    lines = []
    by = {(r.workload, r.target): r.figures for r in results}
    for workload in WORKLOADS:
        for kind in ("relay", "chat"):
            fig = by.get((workload, kind))
            if fig is None:
                continue
            shown = {k: v for k, v in fig.items() if k != "steps"}
            lines.append(
                f"{workload:<12} {kind:<6} " + "  ".join(f"{k}={v}" for k, v in shown.items())
            )
            for step in fig.get("steps", []):
                lines.append(
                    f"{'':<12} {'':<6}   step " + "  ".join(f"{k}={v}" for k, v in step.items())
                )
    ratios = []
    f_chat, f_base = by.get(("fanout", "chat")), by.get(("fanout", "relay"))
    if f_chat and f_base and f_base["server_cpu_pct"]:
        cpu = f_chat["server_cpu_pct"] / f_base["server_cpu_pct"]
        ratios.append(
            f"fanout server CPU chat/relay = {cpu:.2f}x (target <= 1.15x); "
            f"p99 chat {f_chat['p99_ms']} ms (target <= 15)"
        )
    s_chat, s_base = by.get(("saturation", "chat")), by.get(("saturation", "relay"))
    if s_chat and s_base and s_base["sustained_deliveries_per_s"]:
        ratio = s_chat["sustained_deliveries_per_s"] / s_base["sustained_deliveries_per_s"]
        ratios.append(f"saturation deliveries/s chat/relay = {ratio:.2f}x (target >= 0.9x)")
    i_chat, i_base = by.get(("idle", "chat")), by.get(("idle", "relay"))
    if i_chat and i_base:
        ratios.append(
            f"idle KiB/connection chat {i_chat['kib_per_connection']} vs relay "
            f"{i_base['kib_per_connection']} (target <= 16); marginal "
            f"{i_chat['marginal_kib_per_connection']} vs {i_base['marginal_kib_per_connection']}"
        )
    p_chat = by.get(("persistence", "chat"))
    if p_chat:
        ratios.append(
            f"persistence {p_chat['acked_per_s']} acked msgs/s (target >= 20000), "
            f"acked but not stored: {p_chat['acked_but_not_stored']}"
        )
    for result in results:
        fig = result.figures
        gen = fig.get("generator_cpu_pct")
        if isinstance(gen, (int, float)) and gen > 90:
            ratios.append(
                f"WARNING: the generator used {gen}% CPU in {result.workload}/{result.target}: "
                "it may be the bottleneck there"
            )
    return "\n".join([f"machine: {machine()}", *lines, "", *ratios])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chat-bench", description=__doc__)
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--clients", type=int, default=100, help="clients in the fan-out room")
    parser.add_argument("--rate", type=float, default=5.0, help="msg/s per client (fan-out)")
    parser.add_argument(
        "--rates", default="5,6,7,8,10,12,14,16,20", help="msg/s per client, the saturation steps"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections")
    parser.add_argument("--senders", type=int, default=50, help="senders (persistence)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    limit = raise_nofile()
    if "idle" in args.workloads and limit < args.idle + 500:  # per process
        parser.error(f"open files limit {limit} is too low for {args.idle} idle connections")
    if not pin(0, GENERATOR_CPU):
        print("note: fewer than 2 CPUs: generator and server share one", file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(run(args))
    else:
        results = uvloop.run(run(args))
    print(report(results))
    if args.json:
        data: list[dict[str, Any]] = [vars(r) for r in results]
        with open(args.json, "w") as file:
            json.dump({"machine": machine(), "results": data}, file, indent=1)


if __name__ == "__main__":
    main()
