"""``python -m chat_server.backup DEST``: a consistent copy of a live database.

Uses SQLite's online backup API in one step: the copy is one read transaction, a
consistent snapshot, while the server keeps writing (in WAL mode writers do not block a
reader). A backup in many small steps would start over each time the server commits, and
never finish on a large database under steady writes. The copy is then checked with
``PRAGMA integrity_check``. The source is ``--db`` or ``CHAT_DB`` (default ``chat.db``),
as the server reads it. Exit status 0 only if the copy is complete and intact; 2 for a
PostgreSQL store, which is backed up with PostgreSQL's own ``pg_dump``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from chat_server.backends import is_postgres, sqlite_path

PG_DUMP = (
    "the store is PostgreSQL: back it up with pg_dump, e.g. docker compose -f compose.yaml"
    " -f compose.cluster.yaml exec postgres pg_dump -U chat chat > chat.sql"
)


def backup(source: Path, dest: Path) -> tuple[str, int]:
    """Copy ``source`` to ``dest``; returns (integrity_check result, message count)."""
    if not source.exists():
        raise FileNotFoundError(source)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # one step (pages=-1): see the module docstring
            integrity = "; ".join(row[0] for row in dst.execute("PRAGMA integrity_check"))
            count = int(dst.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            dst.close()
    finally:
        src.close()
    os.replace(tmp, dest)  # the destination is never a half-written file
    return integrity, count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chat_server.backup", description=__doc__)
    parser.add_argument("dest", type=Path, help="file to write the copy to")
    parser.add_argument(
        "--db",
        default=os.environ.get("CHAT_DB", "chat.db"),
        help="database to copy: a path or sqlite:///path [CHAT_DB, default chat.db]",
    )
    args = parser.parse_args(argv)
    if is_postgres(args.db):
        print(PG_DUMP, file=sys.stderr)
        sys.exit(2)
    try:
        integrity, count = backup(sqlite_path(args.db), args.dest)
    except (OSError, sqlite3.Error, ValueError) as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.dest}: {count} messages, integrity_check: {integrity}")
    sys.exit(0 if integrity == "ok" else 1)


if __name__ == "__main__":
    main()
