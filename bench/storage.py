"""The storage-only limit: the server's group-commit writes straight to SQLite, no network.

``python -m bench.storage --seconds S --batches 1,64,512`` creates a database with the
server's own schema (``Store.open`` runs its migrations), then, for each batch size,
commits batches of rows shaped like the server's for ``S`` seconds, in WAL mode with
``synchronous=FULL``, in three ways:

- ``sqlite3``: one multi-row ``INSERT OR IGNORE`` per batch, autocommit (one commit), in
  the calling thread: what SQLite and the disk can do;
- ``aiosqlite``: the same statement through ``aiosqlite`` from an event loop, one thread
  hop per batch, as the server's writer does it;
- ``executemany``: ``executemany`` of single-row inserts inside ``BEGIN``/``COMMIT``,
  for comparison.

It prints one JSON object. Columns come from the database (``PRAGMA table_info``), so a
changed schema is followed without editing this file. ``--drop-index`` drops some of the
schema's indexes first, to see what each costs per row (``--ways`` picks the ways).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BODY = "b|0|0|0|" + "x" * 192  # 200 characters, as the persistence workload sends


def create(path: Path, drop: Sequence[str] = ()) -> None:
    from chat_server.backends.sqlite import Store

    async def make() -> None:
        store = await Store.open(path)
        await store.close()

    asyncio.run(make())
    if drop:
        db = sqlite3.connect(path)
        for index in drop:
            db.execute(f'DROP INDEX "{index}"')
        db.commit()
        db.close()


def columns(db: sqlite3.Connection) -> list[tuple[str, str, bool]]:
    """(name, declared type, NOT NULL) of the messages table."""
    return [
        (str(row[1]), str(row[2]).upper(), bool(row[3]))
        for row in db.execute("PRAGMA table_info(messages)")
    ]


def row_maker(cols: Sequence[tuple[str, str, bool]]) -> Callable[[int], tuple[Any, ...]]:
    """Values like the server's: room messages from 50 senders, 200-character bodies.

    Cheap on purpose (the constant columns are built once), so that what is measured is
    SQLite and the disk, not this generator.
    """
    ts = time.time_ns() // 1_000_000
    senders = [f"p{k}" for k in range(50)]
    channels = [f"#{name}" for name in senders]
    fixed: dict[str, Any] = {
        "ts": ts,
        "recipient_key": None,
        "recipient": None,
        "action": 0,
        "body": BODY,
    }
    per_row: dict[str, Callable[[int], Any]] = {
        "id": lambda n: n,
        "channel": lambda n: channels[n % 50],
        "room": lambda n: senders[n % 50],
        "sender_key": lambda n: senders[n % 50],
        "sender": lambda n: senders[n % 50],
        "cid": lambda n: f"c{n}",
    }
    getters: list[Callable[[int], Any]] = []
    for name, kind, notnull in cols:
        if name in per_row:
            getters.append(per_row[name])
        else:
            constant = fixed.get(name, (0 if "INT" in kind else "") if notnull else None)
            getters.append(_constant(constant))

    def make(n: int) -> tuple[Any, ...]:
        return tuple([get(n) for get in getters])

    return make


def _constant(value: Any) -> Callable[[int], Any]:
    return lambda n: value


def statement(cols: Sequence[tuple[str, str, bool]], batch: int) -> str:
    names = ", ".join(name for name, _, _ in cols)
    marks = "(" + ", ".join("?" for _ in cols) + ")"
    return f"INSERT OR IGNORE INTO messages ({names}) VALUES " + ", ".join([marks] * batch)


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    return db


def run_sqlite3(path: Path, batch: int, seconds: float, start: int) -> tuple[int, float]:
    db = connect(path)
    cols = columns(db)
    make = row_maker(cols)
    sql = statement(cols, batch)
    n = start
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        params = [v for i in range(n, n + batch) for v in make(i)]
        db.execute(sql, params)
        n += batch
    wall = time.monotonic() - started
    db.close()
    return n - start, wall


def run_executemany(path: Path, batch: int, seconds: float, start: int) -> tuple[int, float]:
    db = connect(path)
    cols = columns(db)
    make = row_maker(cols)
    sql = statement(cols, 1)
    n = start
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        db.execute("BEGIN")
        db.executemany(sql, [make(i) for i in range(n, n + batch)])
        db.execute("COMMIT")
        n += batch
    wall = time.monotonic() - started
    db.close()
    return n - start, wall


def run_aiosqlite(path: Path, batch: int, seconds: float, start: int) -> tuple[int, float]:
    import aiosqlite

    async def go() -> tuple[int, float]:
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        cols = [
            (str(r[1]), str(r[2]).upper(), bool(r[3]))
            for r in await db.execute_fetchall("PRAGMA table_info(messages)")
        ]
        make = row_maker(cols)
        sql = statement(cols, batch)
        n = start
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            params = [v for i in range(n, n + batch) for v in make(i)]
            await db.execute(sql, params)
            n += batch
        wall = time.monotonic() - started
        await db.close()
        return n - start, wall

    try:
        import uvloop
    except ImportError:
        return asyncio.run(go())
    return uvloop.run(go())


WAYS = {"sqlite3": run_sqlite3, "aiosqlite": run_aiosqlite, "executemany": run_executemany}


def measure(
    batches: Sequence[int],
    seconds: float,
    directory: str | None = None,
    *,
    drop: Sequence[str] = (),
    ways: Sequence[str] = tuple(WAYS),
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chat-storage-", dir=directory) as tmp:
        path = Path(tmp) / "storage.db"
        create(path, drop)
        results = []
        n = 1
        for batch in batches:
            for way in ways:
                run = WAYS[way]
                rows, wall = run(path, batch, seconds, n)
                n += rows
                results.append(
                    {
                        "way": way,
                        "batch": batch,
                        "rows_per_s": round(rows / wall),
                        "commits_per_s": round(rows / batch / wall, 1),
                        "ms_per_commit": round(wall / (rows / batch) * 1000, 3),
                    }
                )
        return {
            "synchronous": "FULL",
            "journal_mode": "WAL",
            "dropped_indexes": list(drop),
            "results": results,
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size and way")
    parser.add_argument("--batches", default="1,64,512", help="comma-separated batch sizes")
    parser.add_argument("--dir", help="where to put the database (default: the temp dir)")
    parser.add_argument("--drop-index", default="", help="comma-separated indexes to drop")
    parser.add_argument(
        "--ways", default=",".join(WAYS), help="comma-separated, of " + ", ".join(WAYS)
    )
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    drop = [name for name in args.drop_index.split(",") if name]
    ways = [way for way in args.ways.split(",") if way]
    unknown = set(ways) - set(WAYS)
    if unknown:
        parser.error(f"unknown ways: {', '.join(sorted(unknown))}")
    json.dump(measure(batches, args.seconds, args.dir, drop=drop, ways=ways), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
