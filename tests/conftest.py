from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


# PostgreSQL in a container (session-scoped), a fresh database per test.
from tests.pg import pg_url, postgres, private_postgres  # noqa: E402, F401

# The compose deployment (module-scoped: each test module gets its own project).
from tests.stack import stack  # noqa: E402, F401
