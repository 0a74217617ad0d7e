"""JSON encoding of frames, and strict parsing of the frames a client sends.

Every frame is one WebSocket text message holding one JSON object with a string
``type``. Parsing turns a client frame into a typed dataclass or raises
:class:`ProtocolError` with the code the server sends back.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from chat_protocol.errors import ErrorCode, ProtocolError
from chat_protocol.limits import (
    DEFAULT_ROOM,
    HISTORY_DEFAULT,
    HISTORY_MAX,
    MAX_BODY_CHARS,
    MAX_REF_CHARS,
    MAX_ROOMS,
    ROOMS_PAGE_DEFAULT,
    ROOMS_PAGE_MAX,
    WHITE_SPACE,
)
from chat_protocol.names import is_valid_cid, is_valid_nick, is_valid_secret, normalize_room

Frame = dict[str, Any]

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(frame: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, ready for a text frame."""
    return _encoder.encode(frame).encode()


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (RFC 8259 has no NaN or Infinity)")


# One decoder for every frame: ``json.loads`` with an argument builds a new one per call.
class _Decoder(json.JSONDecoder):
    #: Set by JSONDecoder itself (the C scanner); declared here for the type checker.
    scan_once: Callable[[str, int], tuple[Any, int]]


_decoder = _Decoder(parse_constant=_not_json)
_scan = _decoder.scan_once


def _loads(data: str) -> Any:
    """``json.loads(data, parse_constant=_not_json)``.

    A frame is one JSON object with nothing around it, which the C scanner reads in one
    call; anything else (white space around it, a BOM, an error) goes through the whole
    of ``json.loads``, so every refusal says what ``json.loads`` says.
    """
    try:
        value, end = _scan(data, 0)
    except (StopIteration, ValueError):
        value, end = None, -1
    if end == len(data):
        return value
    if data.startswith("\ufeff"):  # what json.loads refuses before decoding
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    return _decoder.decode(data)


def decode(data: str | bytes) -> Frame:
    """Parse one frame into a dict that has a string ``type``."""
    if isinstance(data, bytes):
        raise ProtocolError(ErrorCode.BINARY_FRAME, "binary frames are not supported; send text")
    try:
        frame = _loads(data)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {exc}") from None
    except RecursionError:  # about a thousand nested arrays or objects
        raise ProtocolError(ErrorCode.BAD_JSON, "not valid JSON: nested too deeply") from None
    if not isinstance(frame, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
    if not isinstance(frame.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "field 'type' must be a string")
    return frame


_WHITE_SPACE_CHARS = "".join(sorted(WHITE_SPACE))


def is_body_blank(body: str) -> bool:
    """True when every character is Unicode White_Space (an empty body counts)."""
    return not body.strip(_WHITE_SPACE_CHARS)


def encodable(text: str) -> bool:
    """False for a string holding a lone surrogate (valid JSON, not valid UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# --- client frames ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    nick: str
    secret: str | None
    rooms: tuple[str, ...]
    resume: int | None
    history: int
    takeover: bool = True


@dataclass(frozen=True, slots=True)
class Send:
    cid: str
    body: str
    room: str | None
    to: str | None
    action: bool


@dataclass(frozen=True, slots=True)
class Join:
    room: str


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


@dataclass(frozen=True, slots=True)
class Nick:
    nick: str
    secret: str | None
    takeover: bool = True


@dataclass(frozen=True, slots=True)
class Who:
    room: str | None
    after: str | None = None


@dataclass(frozen=True, slots=True)
class Rooms:
    after: str | None = None
    limit: int = ROOMS_PAGE_DEFAULT


@dataclass(frozen=True, slots=True)
class History:
    """Exactly one of ``room``, ``with_nick`` and ``direct`` says what to page through."""

    room: str | None
    with_nick: str | None
    before: int | None
    limit: int
    direct: bool = False


ClientFrame = Hello | Send | Join | Leave | Nick | Who | Rooms | History


def ref_of(frame: Frame) -> str | None:
    """The client's optional correlation string, echoed in replies and errors.

    Raises ``bad_frame`` for a ``ref`` that is present but not 1-64 code points of
    encodable text: such a frame is refused as a whole.
    """
    ref = frame.get("ref")
    if ref is None:
        return None
    if isinstance(ref, str) and 0 < len(ref) <= MAX_REF_CHARS and encodable(ref):
        return ref
    raise ProtocolError(ErrorCode.BAD_FRAME, f"field 'ref' must be a string of 1-{MAX_REF_CHARS}")


def cid_of(frame: Frame) -> str | None:
    """The ``cid`` of a ``send`` frame when it is valid, so errors about it can carry it."""
    cid = frame.get("cid")
    if frame.get("type") == "send" and isinstance(cid, str) and is_valid_cid(cid):
        return cid
    return None


def parse_client_frame(frame: Frame) -> ClientFrame:
    kind = frame["type"]
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown frame type {kind[:40]!r}")
    return parser(frame)


def _field(frame: Frame, name: str, kind: type, *, required: bool = True) -> Any:
    if name not in frame or frame[name] is None:
        if required:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"field {name!r} is required")
        return None
    value = frame[name]
    # bool is an int in Python; JSON true must not pass for a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field {name!r} must be a {_TYPE_NAMES[kind]}")
    return value


_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", list: "array"}


def _nick(frame: Frame, name: str) -> str:
    nick: str = _field(frame, name, str)
    if not is_valid_nick(nick):
        raise ProtocolError(
            ErrorCode.NICK_INVALID,
            "a nick is 1-24 characters: ASCII letters, digits, '_' and '-', not starting with '-'",
        )
    return nick


def _room(value: str) -> str:
    room = normalize_room(value)
    if room is None:
        raise ProtocolError(
            ErrorCode.ROOM_INVALID,
            "a room name is 1-32 characters: a-z, 0-9, '_' and '-', not starting with '-'",
        )
    return room


def _secret(frame: Frame) -> str | None:
    secret: str | None = _field(frame, "secret", str, required=False)
    if secret is not None and not is_valid_secret(secret):
        raise ProtocolError(ErrorCode.BAD_FRAME, "field 'secret' must be 1-128 of A-Z a-z 0-9 _ -")
    return secret


def _takeover(frame: Frame) -> bool:
    value: bool | None = _field(frame, "takeover", bool, required=False)
    return True if value is None else value


def _id(frame: Frame, name: str) -> int | None:
    value: int | None = _field(frame, name, int, required=False)
    if value is not None and not 0 <= value < 2**63:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field {name!r} must be a non-negative id")
    return value


def _count(frame: Frame, name: str, low: int, high: int, default: int) -> int:
    value: int | None = _field(frame, name, int, required=False)
    if value is None:
        return default
    if not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field {name!r} must be {low}-{high}")
    return value


def _hello(frame: Frame) -> Hello:
    rooms_field: list[Any] | None = _field(frame, "rooms", list, required=False)
    if rooms_field is None:
        rooms: tuple[str, ...] = (DEFAULT_ROOM,)
    else:
        if len(rooms_field) > MAX_ROOMS:
            raise ProtocolError(ErrorCode.TOO_MANY_ROOMS, f"at most {MAX_ROOMS} rooms")
        if not all(isinstance(r, str) for r in rooms_field):
            raise ProtocolError(ErrorCode.BAD_FRAME, "field 'rooms' must be an array of strings")
        rooms = tuple(dict.fromkeys(_room(r) for r in rooms_field))
    return Hello(
        nick=_nick(frame, "nick"),
        secret=_secret(frame),
        rooms=rooms,
        resume=_id(frame, "resume"),
        history=_count(frame, "history", 0, HISTORY_MAX, HISTORY_DEFAULT),
        takeover=_takeover(frame),
    )


def _send(frame: Frame) -> Send:
    cid: str = _field(frame, "cid", str)
    if not is_valid_cid(cid):
        raise ProtocolError(ErrorCode.CID_INVALID, "field 'cid' must be 1-64 of A-Z a-z 0-9 _ -")
    body: str = _field(frame, "body", str)
    if len(body) > MAX_BODY_CHARS:
        raise ProtocolError(ErrorCode.BODY_INVALID, f"the body is over {MAX_BODY_CHARS} characters")
    if is_body_blank(body):
        raise ProtocolError(ErrorCode.BODY_INVALID, "the body is empty or only white space")
    if not encodable(body):
        raise ProtocolError(ErrorCode.BODY_INVALID, "the body has a lone surrogate")
    room_field: str | None = _field(frame, "room", str, required=False)
    to: str | None = None
    if "to" in frame and frame["to"] is not None:
        to = _nick(frame, "to")
    if (room_field is None) == (to is None):
        raise ProtocolError(ErrorCode.BAD_FRAME, "give exactly one of 'room' and 'to'")
    action = _field(frame, "action", bool, required=False) or False
    room = _room(room_field) if room_field is not None else None
    return Send(cid=cid, body=body, room=room, to=to, action=action)


def _join(frame: Frame) -> Join:
    return Join(room=_room(_field(frame, "room", str)))


def _leave(frame: Frame) -> Leave:
    return Leave(room=_room(_field(frame, "room", str)))


def _nick_frame(frame: Frame) -> Nick:
    return Nick(nick=_nick(frame, "nick"), secret=_secret(frame), takeover=_takeover(frame))


def _who(frame: Frame) -> Who:
    room: str | None = _field(frame, "room", str, required=False)
    after = _nick(frame, "after") if frame.get("after") is not None else None
    return Who(room=_room(room) if room is not None else None, after=after)


def _rooms(frame: Frame) -> Rooms:
    after: str | None = _field(frame, "after", str, required=False)
    return Rooms(
        after=_room(after) if after is not None else None,
        limit=_count(frame, "limit", 1, ROOMS_PAGE_MAX, ROOMS_PAGE_DEFAULT),
    )


def _history(frame: Frame) -> History:
    room: str | None = _field(frame, "room", str, required=False)
    with_nick = _nick(frame, "with") if frame.get("with") is not None else None
    direct = _field(frame, "direct", bool, required=False) or False
    if (room is not None) + (with_nick is not None) + direct != 1:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, "give exactly one of 'room', 'with' and 'direct': true"
        )
    return History(
        room=_room(room) if room is not None else None,
        with_nick=with_nick,
        before=_id(frame, "before"),
        limit=_count(frame, "limit", 1, HISTORY_MAX, HISTORY_DEFAULT),
        direct=direct,
    )


_PARSERS: dict[str, Callable[[Frame], ClientFrame]] = {
    "hello": _hello,
    "send": _send,
    "join": _join,
    "leave": _leave,
    "nick": _nick_frame,
    "who": _who,
    "rooms": _rooms,
    "history": _history,
}
