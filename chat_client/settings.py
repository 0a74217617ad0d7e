"""What the client remembers for the next start: rooms per server, ignores, highlights.

One small JSON file, ``settings.json`` in the state directory, written atomically. It is
a convenience: a file that cannot be read or written costs the remembered settings,
never a crash (the caller is told why, once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Settings:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "settings.json"
        self.data: dict[str, Any] = {}
        self.problem: str | None = None
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.data = loaded
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            self.problem = f"cannot read {self.path}: {exc}"

    def rooms(self, server: str) -> list[str]:
        servers = self.data.get("servers")
        entry = servers.get(server) if isinstance(servers, dict) else None
        rooms = entry.get("rooms") if isinstance(entry, dict) else None
        return [r for r in rooms if isinstance(r, str)] if isinstance(rooms, list) else []

    def set_rooms(self, server: str, rooms: list[str]) -> None:
        servers = self.data.setdefault("servers", {})
        if not isinstance(servers, dict):
            servers = self.data["servers"] = {}
        servers.setdefault(server, {})["rooms"] = list(rooms)
        self.save()

    def words(self, name: str) -> list[str]:
        value = self.data.get(name)
        return [w for w in value if isinstance(w, str)] if isinstance(value, list) else []

    def set_words(self, name: str, words: list[str]) -> None:
        self.data[name] = list(words)
        self.save()

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(f".settings.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
            self.problem = None
        except OSError as exc:
            self.problem = f"cannot save {self.path}: {exc.strerror or exc}"
