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
from pathlib import Path
from typing import Any

import pytest

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
