"""Rules for nicks, rooms, secrets and client message ids.

Nicks and rooms are ASCII on purpose: look-alike letters from other scripts would let
one user pass for another, which unique nicks exist to prevent.
"""

import re

from chat_protocol.limits import MAX_CID_CHARS, MAX_NICK_CHARS, MAX_ROOM_CHARS, MAX_SECRET_CHARS

NICK_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_-]{{0,{MAX_NICK_CHARS - 1}}}")
ROOM_RE = re.compile(rf"[a-z0-9_][a-z0-9_-]{{0,{MAX_ROOM_CHARS - 1}}}")
# A room name as a client may send it: ASCII letters of either case, lower-cased after.
_ROOM_SENT_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_-]{{0,{MAX_ROOM_CHARS - 1}}}")
CID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CID_CHARS}}}")
SECRET_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_SECRET_CHARS}}}")


def is_valid_nick(nick: str) -> bool:
    return NICK_RE.fullmatch(nick) is not None


def nick_key(nick: str) -> str:
    """The case-insensitive identity of a nick: ``Alice`` and ``alice`` are one user."""
    return nick.lower()


def normalize_room(room: str) -> str | None:
    """Lower-case a room name and drop one leading ``#``; None if it is not valid.

    The name is checked as sent, then lower-cased: the other way round, a letter outside
    the rules would pass as one inside them (``str.lower`` makes U+212A KELVIN SIGN a ``k``).
    """
    name = room[1:] if room.startswith("#") else room
    return name.lower() if _ROOM_SENT_RE.fullmatch(name) else None


def is_valid_cid(cid: str) -> bool:
    return CID_RE.fullmatch(cid) is not None


def is_valid_secret(secret: str) -> bool:
    return SECRET_RE.fullmatch(secret) is not None
