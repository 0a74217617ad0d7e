"""What the client remembers for the next start: rooms per server, ignores, highlights.

One small JSON file, ``settings.json`` in the state directory, written atomically. It is
a convenience: a file that cannot be read or written costs the remembered settings,
never a crash (the caller is told why, once).

Several clients of one person may share the directory, so a save changes only what this
client changed: under a lock, it reads the file afresh, sets its own keys and writes it
back (one client's ``/highlight`` survives another's ``/join``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Settings:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "settings.json"
        self.data: dict[str, Any] = {}
        self.problem: str | None = None
        self._changed: dict[tuple[str, ...], Any] = {}  # key path -> value, this client's
        try:
            self.data = self._read()
        except (OSError, ValueError) as exc:
            self.problem = f"cannot read {self.path}: {exc}"

    def _read(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def rooms(self, server: str) -> list[str]:
        servers = self.data.get("servers")
        entry = servers.get(server) if isinstance(servers, dict) else None
        rooms = entry.get("rooms") if isinstance(entry, dict) else None
        return [r for r in rooms if isinstance(r, str)] if isinstance(rooms, list) else []

    def set_rooms(self, server: str, rooms: list[str]) -> None:
        self._changed[("servers", server, "rooms")] = list(rooms)
        self.save()

    def words(self, name: str) -> list[str]:
        value = self.data.get(name)
        return [w for w in value if isinstance(w, str)] if isinstance(value, list) else []

    def set_words(self, name: str, words: list[str]) -> None:
        self._changed[(name,)] = list(words)
        self.save()

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._locked():
                try:
                    data = self._read()
                except ValueError:
                    data = {}  # unreadable: ours replaces it
                for path, value in self._changed.items():
                    _put(data, path, value)
                tmp = self.path.with_name(f".settings.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, self.path)
            self.data = data
            self.problem = None
        except OSError as exc:
            for path, value in self._changed.items():
                _put(self.data, path, value)
            self.problem = f"cannot save {self.path}: {exc.strerror or exc}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(".settings.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[path[-1]] = value
