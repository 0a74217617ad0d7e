"""The shared wire module: what it accepts, what it refuses and with which code."""

import json
from typing import Any

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
        ("NaN", ErrorCode.BAD_JSON),
        ('{"type": "history", "room": "lobby", "before": Infinity}', ErrorCode.BAD_JSON),
        ('{"type": "history", "room": "lobby", "before": -Infinity}', ErrorCode.BAD_JSON),
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


# Letters outside a-z that Python lower-cases to ASCII (U+212A KELVIN SIGN -> k), or to
# ASCII and a mark (U+0130 -> i + U+0307); a name is checked as sent (attack-r4 F7).
LOOKALIKES = ["\u212a", "\u212aelvin", "#\u212a", "\u0130", "sta\u0130r"]
ROOM_FRAMES = [
    {"type": "hello", "nick": "a", "rooms": ["lobby", "{}"]},
    {"type": "join", "room": "{}"},
    {"type": "leave", "room": "{}"},
    {"type": "send", "cid": "1", "room": "{}", "body": "x"},
    {"type": "who", "room": "{}"},
    {"type": "rooms", "after": "{}"},
    {"type": "history", "room": "{}"},
]
NICK_FRAMES = [
    {"type": "hello", "nick": "{}"},
    {"type": "nick", "nick": "{}"},
    {"type": "send", "cid": "1", "to": "{}", "body": "x"},
    {"type": "who", "after": "{}"},
    {"type": "history", "with": "{}"},
]


def _filled(frame: dict[str, object], name: str) -> str:
    return json.dumps(frame).replace("{}", json.dumps(name)[1:-1])


@pytest.mark.parametrize("name", LOOKALIKES)
@pytest.mark.parametrize("frame", ROOM_FRAMES, ids=lambda f: f"{f['type']}-room")
def test_a_room_name_is_checked_as_sent_not_after_lower_casing(
    frame: dict[str, object], name: str
) -> None:
    assert normalize_room(name) is None
    with pytest.raises(ProtocolError) as caught:
        parse(_filled(frame, name))
    assert caught.value.code is ErrorCode.ROOM_INVALID
    assert parse(_filled(frame, "#Kelvin")) == parse(_filled(frame, "kelvin"))


@pytest.mark.parametrize("name", LOOKALIKES[:2] + LOOKALIKES[3:])
@pytest.mark.parametrize("frame", NICK_FRAMES, ids=lambda f: f"{f['type']}-nick")
def test_a_nick_is_checked_as_sent(frame: dict[str, object], name: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(_filled(frame, name))
    assert caught.value.code is ErrorCode.NICK_INVALID


@pytest.mark.parametrize("ref", ['"\\ud800"', '""', '"' + "r" * 65 + '"', "7", "true", "[]"])
def test_an_invalid_ref_refuses_the_frame(ref: str) -> None:
    from chat_protocol.frames import ref_of

    assert ref_of(decode('{"type":"rooms","ref":"ok-1"}')) == "ok-1"
    assert ref_of(decode('{"type":"rooms","ref":null}')) is None
    with pytest.raises(ProtocolError) as caught:
        ref_of(decode('{"type":"rooms","ref":' + ref + "}"))
    assert caught.value.code is ErrorCode.BAD_FRAME


def test_deeply_nested_json_is_bad_json_not_a_crash() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode("[" * 1000)
    assert caught.value.code is ErrorCode.BAD_JSON
    with pytest.raises(ProtocolError) as caught:
        decode('{"type":"send","body":' + "[" * 50_000 + "]" * 50_000 + "}")
    assert caught.value.code is ErrorCode.BAD_JSON


@pytest.mark.parametrize(
    ("secret", "ok"),
    [
        ("Fh3kQ2-_x", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("\\ud800", False),  # the lone surrogate that once stopped the writer
        ("caf\\u00e9", False),
        ("two words", False),
    ],
)
def test_secret_rules(secret: str, ok: bool) -> None:
    text = '{"type":"hello","nick":"a","secret":"' + secret + '"}'
    for kind in ("hello", "nick"):
        frame = text.replace('"hello"', f'"{kind}"')
        if ok:
            parse(frame)
        else:
            with pytest.raises(ProtocolError) as caught:
                parse(frame)
            assert caught.value.code is ErrorCode.BAD_FRAME


def test_white_space_is_the_unicode_property() -> None:
    from chat_protocol.frames import is_body_blank
    from chat_protocol.limits import WHITE_SPACE

    assert len(WHITE_SPACE) == 25
    assert is_body_blank("\t\n \u00a0\u2028\u3000\u200a")
    # Not White_Space, though Python's str.isspace() says so for the first four.
    for char in ("\x1c", "\x1d", "\x1e", "\x1f", "\u200b", "\u180e", "\ufeff"):
        assert not is_body_blank(char), repr(char)
        assert isinstance(
            parse(encode({"type": "send", "cid": "1", "room": "a", "body": char}).decode()), Send
        )


def test_new_request_fields() -> None:
    from chat_protocol.frames import History, Nick, Rooms, Who

    assert parse('{"type":"hello","nick":"a","takeover":false}') == Hello(
        nick="a", secret=None, rooms=("lobby",), resume=None, history=50, takeover=False
    )
    assert parse('{"type":"nick","nick":"b"}') == Nick(nick="b", secret=None, takeover=True)
    assert parse('{"type":"history","direct":true,"limit":5}') == History(
        room=None, with_nick=None, before=None, limit=5, direct=True
    )
    assert parse('{"type":"rooms","after":"#Dev","limit":500}') == Rooms(after="dev", limit=500)
    assert parse('{"type":"rooms"}') == Rooms(after=None, limit=100)
    assert parse('{"type":"who","room":"x","after":"Bob"}') == Who(room="x", after="Bob")
    for bad in (
        '{"type":"history","direct":true,"room":"a"}',
        '{"type":"history"}',
        '{"type":"rooms","limit":501}',
        '{"type":"rooms","limit":0}',
        '{"type":"hello","nick":"a","takeover":"no"}',
    ):
        with pytest.raises(ProtocolError):
            parse(bad)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"who"}',
        ' {"type":"who"}',
        '{"type":"who"}\n',
        '\ufeff{"type":"who"}',
        '{"type":"who","n":NaN}',
        '{"type":"who"}x',
        '{"type":"who"}{}',
        "",
        "[1]",
        '{"type":',
        '{"type":"who","n":Infinity}',
    ],
)
def test_decode_accepts_and_refuses_what_json_loads_does(text: str) -> None:
    """decode reads a bare object in one scanner call; everything else must still be
    accepted, or refused with json.loads's own words."""
    import json

    def outcome(parse: Any) -> tuple[str, str]:
        try:
            return "ok", repr(parse(text))
        except (ValueError, ProtocolError) as exc:
            message = exc.message if isinstance(exc, ProtocolError) else str(exc)
            return "refused", message.removeprefix("not valid JSON: ")

    def reference(data: str) -> Any:
        def constant(name: str) -> Any:
            raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")

        value = json.loads(data, parse_constant=constant)
        if not isinstance(value, dict):
            raise ValueError("a frame must be a JSON object")
        return value

    assert outcome(decode) == outcome(reference)
