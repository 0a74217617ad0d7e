"""Client pieces without a network: sanitizing, the model, commands, the UI's rendering."""

from __future__ import annotations

from typing import Any

import pytest

from chat_client.commands import Command, Invalid, Say, parse
from chat_client.linemode import format_entry
from chat_client.model import ChatModel, EntryKind
from chat_client.render import Look, render_entry
from chat_client.sanitize import clean

HOSTILE = {
    "csi": "\x1b[2J\x1b[H",
    "csi 8-bit": "\x9b2J",
    "osc title": "\x1b]0;pwned\x07",
    "osc 8 link": "\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\",
    "osc 52 clipboard": "\x1b]52;c;cm0gLXJmIC8=\x07",
    "osc 8-bit": "\x9d0;pwned\x9c",
    "dcs": "\x1bP+q544e\x1b\\",
    "bel": "\x07",
    "cr": "\rfake line",
    "backspace": "abc\x08\x08\x08",
    "nul": "\x00",
    "rtl override": "\u202etxt.exe",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_clean_removes_every_control(name: str) -> None:
    out = clean("before " + HOSTILE[name] + " after")
    assert out.startswith("before ")
    assert out.endswith(" after")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out), repr(out)
    assert "\u202e" not in out
    assert "pwned" not in out and "52;" not in out


def test_clean_keeps_ordinary_unicode() -> None:
    text = "naïve café ☃ 日本語 e\u0301 👍🏽"
    assert clean(text) == text


def test_clean_newlines() -> None:
    assert clean("a\nb") == "a ⏎ b"
    assert clean("a\nb", keep_newlines=True) == "a\nb"


def msg(id: int, body: str = "x", room: str = "lobby", sender: str = "bob", **extra: Any) -> Any:
    return {
        "type": "msg",
        "id": id,
        "ts": 1_700_000_000_000,
        "room": room,
        "from": sender,
        "body": body,
        "action": False,
        "cid": f"c{id}",
        **extra,
    }


def test_model_shows_each_id_once_in_id_order() -> None:
    model = ChatModel("alice", "lobby")
    for frame in (msg(3), msg(1), msg(2), msg(3), msg(1)):
        model.apply(frame)
    model.apply({"type": "history", "room": "lobby", "messages": [msg(1), msg(2), msg(0)]})
    ids = [e.id for e in model.window("#lobby").lines()]
    assert ids == [0, 1, 2, 3]


def test_pending_until_own_message_comes_back() -> None:
    model = ChatModel("alice", "lobby")
    model.add_pending("mine", "#lobby", "hi", False)
    assert [e.kind for e in model.window("#lobby").lines()] == [EntryKind.PENDING]
    model.apply(msg(7, "hi", sender="alice", cid="mine"))
    assert [(e.kind, e.id) for e in model.window("#lobby").lines()] == [(EntryKind.MESSAGE, 7)]


def test_mentions_dms_and_unread() -> None:
    model = ChatModel("alice", "lobby")
    bells = []
    model.on_mention = bells.append
    model.apply(msg(1, "hey alice!"))
    model.apply(msg(2, "malice is not a mention"))
    model.apply(
        {
            "type": "msg",
            "id": 3,
            "ts": 0,
            "to": "alice",
            "from": "bob",
            "body": "psst",
            "action": False,
            "cid": "d",
        }
    )
    model.apply(msg(4, "elsewhere", room="dev"))
    assert [e.id for e in bells] == [1, 3]
    assert model.window("#lobby").lines()[0].mention
    assert not model.window("#lobby").lines()[1].mention
    assert model.window("@bob").lines()[0].direct
    assert model.window("#dev").unread == 1
    assert model.window("#lobby").unread == 0  # the active window


def test_gap_marker_and_history_fill() -> None:
    model = ChatModel("alice", "lobby")
    model.apply(msg(10))
    model.apply({"type": "gap", "after": 10, "before": 50})
    model.apply(msg(50))
    window = model.window("#lobby")
    assert [e.kind for e in window.lines()] == ["message", "gap", "message"]
    assert window.history_before() == 50
    model.apply({"type": "history", "room": "lobby", "messages": [msg(30), msg(40)], "more": True})
    assert [e.id for e in window.lines()] == [10, None, 30, 40, 50]
    assert window.history_before() == 30
    model.apply({"type": "history", "room": "lobby", "messages": [msg(10), msg(20)], "more": True})
    assert [e.id for e in window.lines()] == [10, 20, 30, 40, 50]
    assert window.gap is None


def test_untrusted_text_reaches_fragments_clean() -> None:
    model = ChatModel("alice", "lobby")
    model.apply(msg(1, "x" + HOSTILE["osc 52 clipboard"] + "y", sender="ev\x1b[1mil"))
    entry = model.window("#lobby").lines()[0]
    for line in render_entry(entry, Look(80)):
        for _, text, *_ in line:
            assert "\x1b" not in text and "\x07" not in text
    line = format_entry(entry)
    assert line is not None and line.endswith("#lobby <evil> xy")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("hello", Say("hello")),
        ("//slash at start", Say("/slash at start")),
        ("/JOIN dev", Command("/join", "dev")),
        ("/part", Command("/leave", "")),
        ("/msg bob hi there", Command("/msg", "bob hi there")),
        ("/msg bob", Invalid("usage: /msg NICK TEXT")),
        ("/history 20", Command("/history", "20")),
        ("/history lots", Invalid("usage: /history [N], N from 1 to 200")),
        ("/fly", Invalid("unknown command /fly; /help lists them")),
        ("   ", None),
    ],
)
def test_parse(line: str, expected: object) -> None:
    assert parse(line) == expected


def test_secret_store_keeps_secrets_per_server_and_nick(tmp_path: Any) -> None:
    from chat_client.secrets import SecretStore

    store = SecretStore(tmp_path)
    assert store.get("ws://a:1", "Alice") is None
    store.put("ws://a:1", "Alice", "s1")
    SecretStore(tmp_path).put("ws://a:1", "bob", "s2")
    store.put("ws://b:2", "alice", "s3")
    assert store.get("ws://a:1", "ALICE") == "s1"
    assert store.get("ws://a:1", "bob") == "s2"
    assert store.get("ws://b:2", "alice") == "s3"
    path = tmp_path / "secrets" / "ws%3A%2F%2Fa%3A1" / "alice"
    assert path.stat().st_mode & 0o777 == 0o600
