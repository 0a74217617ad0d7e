"""The per-message frames written by hand are the bytes ``chat_protocol.encode`` writes."""

from hypothesis import given, settings
from hypothesis import strategies as st

from chat_protocol import encode
from chat_server.encoding import ack_frame, msg_frame
from chat_server.messages import StoredMessage

# Any text a stored message can hold: control characters, quotes, backslashes, U+2028,
# astral characters. (Not lone surrogates: the server refuses them, and neither
# encoder can write them as UTF-8.)
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
ids = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def messages(draw: st.DrawFn) -> StoredMessage:
    direct = draw(st.booleans())
    return StoredMessage(
        id=draw(ids),
        ts=draw(ids),
        room=None if direct else draw(text),
        sender_key=draw(text),
        sender=draw(text),
        recipient_key=draw(text) if direct else None,
        recipient=draw(st.none() | text) if direct else None,
        action=draw(st.booleans()),
        body=draw(text),
        cid=draw(text),
    )


@settings(max_examples=200)
@given(messages())
def test_msg_frame_is_encode_of_the_frame(message: StoredMessage) -> None:
    assert msg_frame(message) == encode(message.frame())


@settings(max_examples=200)
@given(messages(), st.none() | text)
def test_ack_frame_is_encode_of_the_ack(message: StoredMessage, ref: str | None) -> None:
    ack = {"type": "ack", "cid": message.cid, "id": message.id, "ts": message.ts}
    if ref is not None:
        ack["ref"] = ref
    assert ack_frame(message, ref) == encode(ack)
