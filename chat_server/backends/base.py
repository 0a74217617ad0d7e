"""The interface every store implements, in the shape of encode/broadcaster's ``backends``.

The server talks to its database only through these methods, so the embedded SQLite
store (``chat_server.store``) and the shared PostgreSQL one (``backends.postgres``) are
interchangeable behind ``CHAT_DB``. Both keep the same promises: a message is reported
to the :class:`CommitListener` only after its commit, ids increase strictly in commit
order, and a ``(sender, cid)`` pair is stored at most once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from chat_server.messages import Draft, StoredMessage
from chat_server.store import CommitListener, NickClaim, StoreUnavailable

__all__ = ["ChatStore", "CommitListener", "NickClaim", "StoreUnavailable"]


class ChatStore(Protocol):
    """Durable history, nick registrations and a group-committing writer."""

    #: False while the database refuses writes; ``last_error`` says why.
    writable: bool
    last_error: str | None
    #: Committed batches and the messages in them (for the shutdown log and metrics).
    batches: int
    batched: int

    @property
    def last_id(self) -> int:
        """The id of the newest message this store committed or found at start."""

    def start(self, listener: CommitListener) -> None:
        """Start the writer; committed batches are reported to ``listener``."""

    async def close(self) -> None:
        """Commit what is queued, stop the writer, release the database."""

    async def submit(self, draft: Draft) -> None:
        """Queue a message for the next group commit (waits only while the queue is full)."""

    async def claim_nick(self, nick: str, key: str, secret: str | None) -> NickClaim: ...

    async def ensure_rooms(self, rooms: Sequence[str]) -> None: ...

    async def probe(self) -> None:
        """Commit a tiny write; raises :class:`StoreUnavailable` when that fails."""

    async def room_history(
        self, room: str, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]: ...

    async def dm_history(
        self, key: str, other_key: str, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]: ...

    async def recent_dms(self, key: str, limit: int) -> tuple[list[StoredMessage], bool]: ...

    async def replay(
        self, after: int, rooms: Sequence[str], key: str, cap: int
    ) -> tuple[list[StoredMessage], bool]: ...

    async def registered_nick(self, key: str) -> str | None: ...

    async def room_names(self) -> list[str]: ...
