from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


# The compose deployment (module-scoped: each test module gets its own project).
from tests.stack import stack  # noqa: E402, F401
