"""PostgreSQL for the tests: a real server in a container, a fresh database per test.

The container runs ``$POSTGRES_IMAGE`` (``postgres:17`` by default; ``.ci/run`` exports
the local stand-in) on a free port of 127.0.0.1, with ``fsync=off``: the tests restart and
kill the database *process*, never the machine, so nothing they check depends on fsync.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from tests.stack import free_port

IMAGE = os.environ.get("POSTGRES_IMAGE", "postgres:17")
PASSWORD = "chat-test"


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr}")
    return done.stdout


@dataclass
class Postgres:
    container: str
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await asyncpg.connect(self.url(), timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            else:
                await conn.close()
                return

    def restart(self) -> None:
        docker("restart", "--time", "5", self.container)

    def stop(self) -> None:
        docker("stop", "--time", "5", self.container)

    def start(self) -> None:
        docker("start", self.container)

    def pause(self) -> None:
        """Freeze the server: connections stay open and nothing answers (a partition)."""
        docker("pause", self.container)

    def unpause(self) -> None:
        docker("unpause", self.container)

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.container, check=False)


def run_postgres() -> Postgres:
    name = f"chat-test-pg-{uuid.uuid4().hex[:8]}"
    port = free_port()
    docker(
        "run", "-d", "--name", name,
        "-e", f"POSTGRES_PASSWORD={PASSWORD}",
        "-p", f"127.0.0.1:{port}:5432",
        IMAGE,
        "-c", "fsync=off", "-c", "max_connections=300",
    )  # fmt: skip
    return Postgres(name, port)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL container for the whole run (tests that restart it get their own)."""
    pg = run_postgres()
    try:
        asyncio.run(pg.wait_ready())
        yield pg
    finally:
        pg.remove()


@pytest.fixture
def private_postgres() -> Iterator[Postgres]:
    """A PostgreSQL container of the test's own, for tests that stop or restart it."""
    pg = run_postgres()
    try:
        asyncio.run(pg.wait_ready())
        yield pg
    finally:
        pg.remove()


async def fresh_database(pg: Postgres) -> str:
    name = f"chat_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg.url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return pg.url(name)


@pytest.fixture
async def pg_url(postgres: Postgres) -> AsyncIterator[str]:
    """The URL of a new, empty database on the shared container."""
    url = await fresh_database(postgres)
    yield url
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
