"""Error codes carried by ``error`` frames, and the close codes the server uses."""

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``code`` field of an ``error`` frame. Stable: clients may switch on it."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    BINARY_FRAME = "binary_frame"
    HELLO_FIRST = "hello_first"
    ALREADY_HELLO = "already_hello"
    NICK_INVALID = "nick_invalid"
    NICK_TAKEN = "nick_taken"
    ROOM_INVALID = "room_invalid"
    NOT_IN_ROOM = "not_in_room"
    TOO_MANY_ROOMS = "too_many_rooms"
    NO_SUCH_NICK = "no_such_nick"
    BODY_INVALID = "body_invalid"
    CID_INVALID = "cid_invalid"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"


class CloseCode(IntEnum):
    """WebSocket close codes the server sends, beyond those websockets sends itself."""

    GOING_AWAY = 1001  # server shutting down
    POLICY = 1008  # flooding, hello timeout, too slow a reader, repeated bad frames
    TOO_BIG = 1009  # frame over MAX_FRAME_BYTES (sent by websockets)
    REPLACED = 4001  # the same nick connected again elsewhere with its secret


class ProtocolError(Exception):
    """A frame the server refuses; becomes an ``error`` frame, never a crash."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
