"""Error codes carried by ``error`` frames, and the close codes the server uses."""

from enum import IntEnum, StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """The ``code`` field of an ``error`` frame. Stable: clients may switch on it."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    BINARY_FRAME = "binary_frame"
    HELLO_FIRST = "hello_first"
    ALREADY_HELLO = "already_hello"
    NICK_INVALID = "nick_invalid"
    NICK_TAKEN = "nick_taken"
    NICK_IN_USE = "nick_in_use"
    ROOM_INVALID = "room_invalid"
    NOT_IN_ROOM = "not_in_room"
    TOO_MANY_ROOMS = "too_many_rooms"
    NO_SUCH_NICK = "no_such_nick"
    BODY_INVALID = "body_invalid"
    CID_INVALID = "cid_invalid"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes the server sends, beyond those websockets sends itself."""

    GOING_AWAY = 1001  # server shutting down
    POLICY = 1008  # flooding, hello timeout, too slow a reader
    TOO_BIG = 1009  # frame over MAX_FRAME_BYTES (sent by websockets)
    INTERNAL = 1011  # server error, or no pong within ping_timeout (sent by websockets)
    REPLACED = 4001  # the same nick connected again elsewhere with its secret


class ProtocolError(Exception):
    """A frame the server refuses; becomes an ``error`` frame, never a crash.

    ``extra`` holds fields the error frame carries beyond ``code`` and ``message``,
    such as ``retry_after`` for ``rate_limited``.
    """

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra
