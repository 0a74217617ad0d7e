"""The nick secrets this user holds, kept in the state directory between runs.

The server gives a nick's secret once, when the nick is first claimed; without it the
nick cannot be claimed again. Each secret is its own file (mode 0600),
``secrets/<server>/<nick>``, written atomically: clients sharing one state directory (the
replicas of a compose service share a volume) never overwrite each other's secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from chat_protocol.names import nick_key


class SecretStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "secrets"

    def _path(self, server: str, nick: str) -> Path:
        # Nick keys are [a-z0-9_-], safe as file names; the URL is percent-encoded.
        return self.root / quote(server, safe="") / nick_key(nick)

    def get(self, server: str, nick: str) -> str | None:
        try:
            return self._path(server, nick).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, server: str, nick: str, secret: str) -> None:
        path = self._path(server, nick)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secret + "\n")
        os.replace(tmp, path)  # atomic: a crash never leaves half a secret
