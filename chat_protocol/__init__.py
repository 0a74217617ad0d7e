"""The compose-chat wire protocol: the one module that server and client share.

Everything a peer must agree on lives here: limits, name rules, error codes and the
JSON encoding of frames. ``docs/protocol.md`` documents the same facts for people.
"""

from chat_protocol.errors import CloseCode, ErrorCode, ProtocolError
from chat_protocol.frames import decode, encode
from chat_protocol.limits import DEFAULT_ROOM, PROTOCOL_VERSION

__all__ = [
    "DEFAULT_ROOM",
    "PROTOCOL_VERSION",
    "CloseCode",
    "ErrorCode",
    "ProtocolError",
    "decode",
    "encode",
]
