"""The nick secrets this person holds, kept in their state directory between runs.

A nick's secret proves that a ``hello`` comes from the person who registered it. The
client proposes its own secret when it registers a nick (256 random bits) and stores it
*before* sending it, so a lost ``welcome`` can never strand the nick; a server that
generates the secret itself returns it in ``welcome``, and that one is stored instead.

Each secret is its own file (mode 0600, in directories of mode 0700),
``secrets/<server>/<nick>``, written atomically. ``<server>`` is ``epoch-<epoch>``, the
database the server announces in its handshake (``Chat-Epoch``): the same person reaches
one server by several URLs (the host's published port, the compose network's name) and
must present the same secret through each. For a server that announces no epoch it is
the percent-encoded URL (as older clients filed every secret; those are found and
refiled). The directory is the person's: in the compose deployment a person's client
bind-mounts their own directory, and each demo replica has its own volume, so no other
client reads it (Docker itself can: its users are root-equivalent).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from urllib.parse import quote

from chat_protocol.names import nick_key

#: Length of a proposed secret: 43 characters of A-Z a-z 0-9 _ - (256 bits).
PROPOSED_BYTES = 32


class SecretStoreError(OSError):
    """A secret cannot be kept: the nick must not be claimed with it."""


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
        except OSError as exc:
            raise SecretStoreError(_explain(exc, self._path(server, nick))) from None

    def put(self, server: str, nick: str, secret: str) -> None:
        path = self._path(server, nick)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.parent.mkdir(exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(secret + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)  # atomic: a crash never leaves half a secret
        except OSError as exc:
            raise SecretStoreError(_explain(exc, path)) from None

    def propose(self, server: str, nick: str) -> str:
        """A new secret for a nick we hold none of, stored before anyone sees it."""
        secret = secrets.token_urlsafe(PROPOSED_BYTES)
        self.put(server, nick, secret)
        return secret

    def discard(self, server: str, nick: str) -> None:
        """Forget a secret that the server did not accept (the nick is someone else's)."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._path(server, nick).unlink()


def _explain(exc: OSError, path: Path) -> str:
    """Say what is wrong with the state directory and how to fix it."""
    problem = f"cannot keep your nick's secret in {path.parent}: {exc.strerror or exc}"
    if not isinstance(exc, PermissionError):
        return problem
    owner = _owner(path)
    me = os.getuid() if hasattr(os, "getuid") else None
    if owner is not None and me is not None and owner != me:
        return (
            f"{problem} (it belongs to uid {owner}, this client runs as uid {me}; in "
            f'Docker, add --user "$(id -u):$(id -g)" to the run command)'
        )
    return problem


def _owner(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return candidate.stat().st_uid
        except OSError:
            continue
    return None
