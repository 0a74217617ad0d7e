"""The shared wire module: what it accepts, what it refuses and with which code."""

import pytest

from chat_protocol import ErrorCode, ProtocolError, decode, encode
from chat_protocol.frames import Hello, Send, parse_client_frame
from chat_protocol.names import is_valid_nick, normalize_room


def parse(text: str) -> object:
    return parse_client_frame(decode(text))


def test_encode_is_compact_utf8() -> None:
    assert encode({"type": "msg", "body": "héllo"}) == '{"type":"msg","body":"héllo"}'.encode()


def test_hello_defaults_to_lobby() -> None:
    hello = parse('{"type":"hello","nick":"alice"}')
    assert hello == Hello(nick="alice", secret=None, rooms=("lobby",), resume=None, history=50)


def test_send_normalizes_room_and_keeps_body_exact() -> None:
    body = "  Ünïcode ☃ \u2028 e\u0301 \u202e  "
    frame = parse(encode({"type": "send", "cid": "c-1", "room": "#Dev", "body": body}).decode())
    assert frame == Send(cid="c-1", body=body, room="dev", to=None, action=False)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_FRAME),
        ('{"type": 3}', ErrorCode.BAD_FRAME),
        ('{"type": "dance"}', ErrorCode.BAD_FRAME),
        ('{"type": "hello"}', ErrorCode.BAD_FRAME),
        ('{"type": "hello", "nick": "bad nick"}', ErrorCode.NICK_INVALID),
        ('{"type": "hello", "nick": "-x"}', ErrorCode.NICK_INVALID),
        ('{"type": "hello", "nick": "' + "a" * 25 + '"}', ErrorCode.NICK_INVALID),
        ('{"type": "hello", "nick": "ålice"}', ErrorCode.NICK_INVALID),
        ('{"type": "hello", "nick": "a", "resume": true}', ErrorCode.BAD_FRAME),
        ('{"type": "hello", "nick": "a", "resume": -1}', ErrorCode.BAD_FRAME),
        ('{"type": "hello", "nick": "a", "rooms": ["x y"]}', ErrorCode.ROOM_INVALID),
        ('{"type": "hello", "nick": "a", "rooms": "lobby"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "cid": "1", "room": "lobby"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "cid": "1", "room": "lobby", "body": "   "}', ErrorCode.BODY_INVALID),
        ('{"type": "send", "cid": "1", "room": "lobby", "body": 5}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "cid": "a b", "room": "lobby", "body": "x"}', ErrorCode.CID_INVALID),
        ('{"type": "send", "cid": "1", "body": "x"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "cid": "1", "room": "a", "to": "b", "body": "x"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "cid": "1", "room": "a", "body": "\\ud800"}', ErrorCode.BODY_INVALID),
        ('{"type": "history", "room": "a", "limit": 0}', ErrorCode.BAD_FRAME),
        ('{"type": "history", "room": "a", "limit": 201}', ErrorCode.BAD_FRAME),
    ],
)
def test_bad_frames_get_their_code(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(text)
    assert caught.value.code is code


def test_body_length_limit_is_in_code_points() -> None:
    ok = encode({"type": "send", "cid": "1", "room": "a", "body": "☃" * 4000}).decode()
    assert isinstance(parse(ok), Send)
    with pytest.raises(ProtocolError) as caught:
        parse(encode({"type": "send", "cid": "1", "room": "a", "body": "x" * 4001}).decode())
    assert caught.value.code is ErrorCode.BODY_INVALID


def test_binary_is_refused() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(b'{"type":"rooms"}')
    assert caught.value.code is ErrorCode.BINARY_FRAME


def test_names() -> None:
    assert is_valid_nick("Alice_2") and is_valid_nick("3f2a9c") and not is_valid_nick("")
    assert normalize_room("#Lobby") == "lobby"
    assert normalize_room("a" * 33) is None
    assert normalize_room("#") is None


def test_a_ref_that_cannot_be_sent_back_is_dropped() -> None:
    from chat_protocol.frames import ref_of

    assert ref_of(decode('{"type":"rooms","ref":"ok-1"}')) == "ok-1"
    assert ref_of(decode('{"type":"rooms","ref":"\\ud800"}')) is None
    assert ref_of(decode('{"type":"rooms","ref":""}')) is None
