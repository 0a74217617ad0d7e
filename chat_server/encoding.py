"""The two frames every stored message costs, encoded without building a dict.

Each message is answered with an ``ack`` to its sender and fanned out as one ``msg``
frame. Building a dict and running it through :func:`chat_protocol.encode` was an eighth
of the server's CPU per message in the persistence benchmark (docs/benchmarks.md); these
functions write the same bytes directly. The output is byte-for-byte what
``chat_protocol.encode`` gives for the same frame (same key order, compact separators,
``ensure_ascii=False``): strings are quoted by the json module's own C string encoder,
the one ``encode`` uses. ``tests/test_encoding.py`` checks the equality on arbitrary text.
"""

from __future__ import annotations

from json.encoder import encode_basestring as _quote
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chat_server.messages import StoredMessage


def _string(text: str | None) -> str:
    return "null" if text is None else _quote(text)


def msg_frame(message: StoredMessage) -> bytes:
    """``chat_protocol.encode(message.frame())``, the bytes every recipient gets."""
    if message.room is not None:
        where = '"room":' + _quote(message.room)
    else:
        where = '"to":' + _string(message.recipient)
    return (
        f'{{"type":"msg","id":{message.id},"ts":{message.ts},{where},'
        f'"from":{_quote(message.sender)},"body":{_quote(message.body)},'
        f'"action":{"true" if message.action else "false"},"cid":{_quote(message.cid)}}}'
    ).encode()


def ack_frame(message: StoredMessage, ref: str | None) -> bytes:
    """The ``ack`` of a stored message: ``{"type":"ack","cid":…,"id":…,"ts":…[,"ref":…]}``."""
    head = f'{{"type":"ack","cid":{_quote(message.cid)},"id":{message.id},"ts":{message.ts}'
    if ref is None:
        return (head + "}").encode()
    return (head + ',"ref":' + _quote(ref) + "}").encode()
