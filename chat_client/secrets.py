"""The nick secrets this user holds, kept in the state directory between runs.

The server gives a nick's secret once, when the nick is first claimed; without it the
nick cannot be claimed again. The file is ``secrets.json`` (mode 0600), one entry per
server URL and nick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chat_protocol.names import nick_key


class SecretStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "secrets.json"

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, server: str, nick: str) -> str | None:
        secret = self._load().get(server, {}).get(nick_key(nick))
        return secret if isinstance(secret, str) else None

    def put(self, server: str, nick: str, secret: str) -> None:
        data = self._load()
        data.setdefault(server, {})[nick_key(nick)] = secret
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(data, file, indent=1)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file
