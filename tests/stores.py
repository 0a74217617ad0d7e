"""One test suite, both stores: a ``db`` fixture that is a SQLite file or a PostgreSQL URL.

A test module that imports :func:`db_on_both_stores` runs every test that takes ``db``
twice: on a fresh SQLite file, and on a fresh database of the PostgreSQL container
(``tests/pg.py``; that variant is marked ``e2e``, since it needs Docker). The server
picks its store from the value, as it does from ``CHAT_DB``. :func:`db_rows` reads either
database with the same SQL (``?`` placeholders).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chat_server.backends.sqlite import Store as SqliteStore
from tests.pg import query

STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)]


@pytest.fixture(name="db", params=STORES)
def db_on_both_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "chat.db"
    url: str = request.getfixturevalue("pg_url")
    return url


async def db_rows(db: Path | str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` from either store; PostgreSQL's bytea bodies come back as text."""
    if isinstance(db, Path):
        with sqlite3.connect(db) as conn:
            return conn.execute(sql, params).fetchall()
    counter = iter(range(1, len(params) + 1))
    sql = re.sub(r"\?", lambda _: f"${next(counter)}", sql)
    return [
        tuple(v.decode() if isinstance(v, bytes) else v for v in row)
        for row in await query(db, sql, *params)
    ]


@asynccontextmanager
async def writes_blocked(db: Path | str) -> AsyncIterator[None]:
    """Hold a lock that keeps the server's message writes waiting (reads go on)."""
    if isinstance(db, Path):
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the writer waits (busy_timeout: 5 s)
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("BEGIN; LOCK TABLE messages IN EXCLUSIVE MODE")
        yield
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()


@asynccontextmanager
async def writes_refused(db: Path | str, store: object) -> AsyncIterator[None]:
    """Make the database refuse the server's writes (messages and the health probe) with
    an error that says "readonly", as a volume remounted read-only does to SQLite."""
    if isinstance(db, Path):
        assert isinstance(store, SqliteStore)
        writer = store._writer
        await writer.execute("PRAGMA query_only = ON")
        try:
            yield
        finally:
            await writer.execute("PRAGMA query_only = OFF")
        return
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(
            "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'the database is readonly (a test)'; END $$;"
            " CREATE TRIGGER test_refuse_messages BEFORE INSERT ON messages"
            " FOR EACH STATEMENT EXECUTE FUNCTION test_refuse();"
            " CREATE TRIGGER test_refuse_probe BEFORE UPDATE ON meta"
            " FOR EACH STATEMENT EXECUTE FUNCTION test_refuse()"
        )
        try:
            yield
        finally:
            await conn.execute(
                "DROP TRIGGER test_refuse_messages ON messages;"
                " DROP TRIGGER test_refuse_probe ON meta; DROP FUNCTION test_refuse()"
            )
    finally:
        await conn.close()
