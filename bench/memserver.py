"""``python -m bench.memserver [chat-server flags]``: the server in-process, under tracemalloc.

The same ``running_server`` and the same flags as ``chat-server``, with ``tracemalloc``
started before the server starts, so the benchmark can ask where an idle
connection's bytes go without any change to the server. It reads commands on stdin and
answers each with one line on stdout:

- ``snapshot NAME``: collect garbage, take a tracemalloc snapshot and count live objects
  by type (``gc.get_objects``: containers only, which is what a connection's state is
  made of) -> ``ok``
- ``report A B N``: what grew from snapshot A to B, divided by N connections -> JSON
"""

from __future__ import annotations

import asyncio
import gc
import json
import linecache
import logging
import sys
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from typing import Any

#: Frames kept per allocation: enough to tell which caller of a library made it.
FRAMES = 6
TOP = 25

Census = dict[str, int]  # type -> live objects


def census() -> Census:
    """Live gc-tracked objects, counted by type in C (``Counter`` over ``map``): under
    tracemalloc every allocation is slow, so nothing is built per object here."""
    counts = Counter(map(type, gc.get_objects()))
    return {f"{k.__module__}.{k.__qualname__}": n for k, n in counts.items()}


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.", "/chat_server/", "/bench/"):
        at = filename.find(marker)
        if at >= 0:
            return filename[at:].removeprefix("site-packages/")
    return filename


def report(
    before: tuple[tracemalloc.Snapshot, Census],
    after: tuple[tracemalloc.Snapshot, Census],
    n: int,
) -> dict[str, Any]:
    # Statistics are filtered after grouping, by their innermost frame (a traceback is
    # ordered oldest frame first, so that is the last one): filtering the
    # traces themselves (Snapshot.filter_traces) takes tens of seconds here.
    own = (__file__, tracemalloc.__file__, linecache.__file__, "<frozen importlib")

    def kept(stats: list[tracemalloc.StatisticDiff]) -> list[tracemalloc.StatisticDiff]:
        return [s for s in stats if not s.traceback[-1].filename.startswith(own)]

    old, new = before[0], after[0]
    by_line = kept(new.compare_to(old, "lineno"))
    by_trace = kept(new.compare_to(old, "traceback"))
    total = sum(stat.size_diff for stat in by_line)
    sites = []
    for stat in sorted(by_line, key=lambda s: s.size_diff, reverse=True)[:TOP]:
        frame = stat.traceback[-1]
        sites.append(
            {
                "site": f"{_short(frame.filename)}:{frame.lineno}",
                "code": linecache.getline(frame.filename, frame.lineno).strip()[:90],
                "bytes_per_connection": round(stat.size_diff / n, 1),
                "blocks_per_connection": round(stat.count_diff / n, 2),
            }
        )
    per_file: Counter[str] = Counter()
    for stat in by_line:
        per_file[_short(stat.traceback[-1].filename)] += stat.size_diff
    files = [
        {"file": name, "bytes_per_connection": round(size / n, 1)}
        for name, size in per_file.most_common(12)
    ]
    traces = []
    for stat in sorted(by_trace, key=lambda s: s.size_diff, reverse=True)[:8]:
        traces.append(
            {
                "bytes_per_connection": round(stat.size_diff / n, 1),
                "stack": [f"{_short(f.filename)}:{f.lineno}" for f in stat.traceback][:FRAMES],
            }
        )
    old_types, new_types = before[1], after[1]
    grown = {name: count - old_types.get(name, 0) for name, count in new_types.items()}
    types = [
        {"type": name, "objects_per_connection": round(count / n, 2)}
        for name, count in sorted(grown.items(), key=lambda kv: kv[1], reverse=True)[:TOP]
        if count > 0
    ]
    return {
        "connections": n,
        "traced_bytes_per_connection": round(total / n, 1),
        "sites": sites,
        "files": files,
        "tracebacks": traces,
        "gc_types": types,
    }


async def serve(argv: Sequence[str]) -> None:
    from chat_server.app import running_server
    from chat_server.config import parse_config

    config = parse_config(argv, environ={})
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr)
    snapshots: dict[str, tuple[tracemalloc.Snapshot, Census]] = {}
    loop = asyncio.get_running_loop()
    async with running_server(config):
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command, *args = line.split()
            if command == "snapshot":
                gc.collect()
                snapshots[args[0]] = (tracemalloc.take_snapshot(), census())
                answer = "ok"
            elif command == "report":
                a, b, n = args[0], args[1], int(args[2])
                answer = json.dumps(report(snapshots[a], snapshots[b], n))
            else:
                answer = json.dumps({"error": f"unknown command {command!r}"})
            sys.stdout.write(answer + "\n")
            sys.stdout.flush()


def main() -> None:
    # Tracing starts after the imports: what they allocate is the same in every snapshot,
    # and leaving it out makes snapshots small enough to compare in seconds.
    import chat_server.app
    import chat_server.config  # noqa: F401

    tracemalloc.start(FRAMES)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(sys.argv[1:]))
    else:
        uvloop.run(serve(sys.argv[1:]))


if __name__ == "__main__":
    main()
