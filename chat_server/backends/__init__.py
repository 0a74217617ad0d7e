"""Stores the server can run on, chosen by one setting (``CHAT_DB``).

* a file path or ``sqlite:///path``: the embedded SQLite store (:mod:`chat_server.backends.sqlite`),
  one server process per file;
* ``postgresql://user:password@host:port/db`` (or ``postgres://``): PostgreSQL through
  asyncpg (:mod:`chat_server.backends.postgres`), shared by any number of replicas.

Every store implements :class:`chat_server.backends.base.ChatStore`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chat_server.backends.base import ChatStore
    from chat_server.config import ServerConfig

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def sqlite_path(url: str) -> Path:
    """The file of a SQLite setting: a plain path, or ``sqlite:///relative`` / ``sqlite:////abs``."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if "://" in url:
        raise ValueError(f"unknown database URL scheme in {url!r} (sqlite:/// or postgresql://)")
    return Path(url)


def redacted(url: str) -> str:
    """The setting as it may be logged: without a password."""
    if not is_postgres(url) or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


async def open_store(config: ServerConfig) -> ChatStore:
    """Open (and migrate) the store ``config.db`` names."""
    url = str(config.db)
    if is_postgres(url):
        from chat_server.backends.postgres import PostgresStore

        return await PostgresStore.open(
            url,
            batch_max=config.batch_max,
            queue_max=config.queue_max,
            batch_wait=config.batch_wait_ms / 1000,
        )
    from chat_server.backends.sqlite import Store

    return await Store.open(
        sqlite_path(url),
        synchronous=config.synchronous,
        batch_max=config.batch_max,
        queue_max=config.queue_max,
        batch_wait=config.batch_wait_ms / 1000,
    )
