"""Client pieces without a network: sanitizing, the model, commands, the UI's rendering."""

from __future__ import annotations

import io
import re
import unicodedata
from typing import Any

import pyte
import pytest
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.vt100 import Vt100_Output

from chat_client.commands import Command, Invalid, Say, parse
from chat_client.connection import ChatConnection
from chat_client.controller import Controller
from chat_client.linemode import format_entry
from chat_client.model import ChatModel, EntryKind
from chat_client.render import Look, render_entry
from chat_client.sanitize import clean
from chat_client.secrets import SecretStore
from chat_client.tui import ChatUI

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
    text = "naïve café ☃ 日本語 e\u0301 👍 क्\u200dष"
    assert clean(text) == text


def test_clean_makes_emoji_sequence_widths_unambiguous() -> None:
    assert clean("👍🏽 👩\u200d💻 ❤\ufe0f 🇯🇵🇫🇷") == "👍 👩💻 ❤ [JP][FR]"
    assert clean("a\u200eb\u200fc\u061cd") == "abcd"
    assert clean("a\u2028b\u2029c") == "a ⏎ b ⏎ c"
    assert clean("a\u2028b", keep_newlines=True) == "a\nb"


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


# --- round 2: wrapping, pacing, failures in words, activity, presence, settings ---------


def test_wrap_breaks_at_words_keeps_indentation_and_cuts_only_overlong_words() -> None:
    from chat_client.render import cells, wrap

    assert wrap("the quick brown fox jumps", 10, 10) == ["the quick", "brown fox", "jumps"]
    assert wrap("prefix takes room here", 6, 12) == ["prefix", "takes room", "here"]
    assert wrap("code:\n    indented line", 40, 40) == ["code:", "    indented line"]
    assert wrap("W" * 25, 10, 10) == ["W" * 10, "W" * 10, "W" * 5]
    wide = wrap("日本語の文章です " * 3, 10, 10)
    assert all(cells(line) <= 10 for line in wide)
    assert wrap("", 10, 10) == [""]


def dm(id: int, body: str, sender: str = "bob") -> Any:
    frame = msg(id, body, sender=sender)
    del frame["room"]
    return {**frame, "to": "alice"}


def test_pacer_mirrors_the_servers_bucket_and_holds_for_retry_after() -> None:
    from chat_client.connection import Pacer

    pacer = Pacer(rate=10, burst=3)  # runs at 90%: 9/s, 2 at once
    assert pacer.wait_time() == 0
    pacer.take()
    pacer.take()
    assert 0.05 < pacer.wait_time() <= 1 / 9
    pacer.hold(5)
    assert pacer.wait_time() > 4.9


def test_limits_come_from_welcome_and_fall_back_on_nonsense() -> None:
    from chat_client.connection import Limits

    limits = Limits.announced({"max_body_chars": 100, "rate": 2, "burst": True, "x": 1})
    assert (limits.max_body_chars, limits.rate, limits.burst) == (100, 2.0, 40.0)
    assert Limits.announced("nonsense") == Limits()


def test_connection_failures_are_said_in_words() -> None:
    import socket

    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    from chat_client.connection import describe_failure

    url = "ws://server:8765"
    gai = socket.gaierror(-2, "Name or service not known")
    assert (
        describe_failure(gai, url) == "cannot find the server 'server' (the name does not resolve)"
    )
    refused = ConnectionRefusedError(111, "Connection refused")
    assert (
        describe_failure(refused, url) == "nothing answers at server:8765 (is the server running?)"
    )
    assert describe_failure(TimeoutError(), url) == "no answer from server:8765 (timed out)"
    busy = InvalidStatus(Response(429, "Too Many Requests", Headers()))
    assert "too many connections from this address" in describe_failure(busy, url)
    for exc in (gai, refused):
        assert "Errno" not in describe_failure(exc, url)


def test_activity_levels_and_the_next_window_to_visit() -> None:
    from chat_client.model import Activity

    model = ChatModel("alice", "lobby")
    model.window("#dev")
    model.window("#ops")
    model.apply({"type": "presence", "event": "join", "room": "ops", "nick": "zed"})
    model.apply(msg(1, "hi all", room="dev"))
    model.apply(dm(2, "psst"))
    model.apply(msg(3, "alice: look", room="lobby"))
    assert model.window("#ops").activity == Activity.LOW
    assert model.window("#dev").activity == Activity.MESSAGE
    assert model.window("@bob").activity == Activity.PRIVATE
    assert model.window("#lobby").activity == Activity.NONE  # on screen
    model.switch("#ops")
    model.apply(msg(4, "ping alice", room="lobby"))
    assert model.window("#lobby").activity == Activity.HIGHLIGHT
    assert model.next_active() == "#lobby"
    model.switch("#lobby")
    assert model.next_active() == "@bob"  # a DM before ordinary messages


def test_joins_in_a_burst_are_one_line_and_line_mode_prints_each_once() -> None:
    import io

    from chat_client.linemode import LinePrinter

    model = ChatModel("alice", "lobby")
    out = io.StringIO()
    model.listeners.append(LinePrinter(out))
    for nick in ("a", "b"):
        model.apply({"type": "presence", "event": "join", "room": "lobby", "nick": nick})
    model.apply({"type": "presence", "event": "join", "room": "lobby", "nicks": ["c", "d"]})
    lines = model.window("#lobby").lines()
    assert [e.text for e in lines] == ["netjoin: 4 joined: a, b, c, d"]
    printed = [line.split(" -- ")[1] for line in out.getvalue().splitlines()]
    assert printed == ["a joined", "b joined", "c, d joined"]


def test_ignored_nicks_and_highlight_words() -> None:
    model = ChatModel("alice", "lobby")
    model.ignored = {"mallory"}
    model.highlights = ["deploy"]
    model.apply(msg(1, "spam", sender="Mallory"))
    model.apply(dm(2, "spam", sender="mallory"))
    model.apply(msg(3, "the deploy is done"))
    model.apply(msg(4, "redeployed"))
    assert [e.id for e in model.window("#lobby").lines()] == [3, 4]
    assert "@mallory" not in model.windows
    assert [e.mention for e in model.window("#lobby").lines()] == [True, False]


def test_a_new_epoch_forgets_message_ids() -> None:
    model = ChatModel("alice", "lobby")
    model.apply({"type": "welcome", "nick": "alice", "epoch": "one"})
    model.apply(msg(1, "old"))
    model.apply({"type": "welcome", "nick": "alice", "epoch": "two"})
    model.apply(msg(1, "new"))
    bodies = [e.text for e in model.window("#lobby").lines() if e.kind == EntryKind.MESSAGE]
    assert bodies == ["new"]


def test_names_follow_the_rooms_history() -> None:
    model = ChatModel("alice", "lobby")
    model.apply({"type": "joined", "room": "lobby", "members": ["alice", "bob"]})
    model.apply({"type": "history", "room": "lobby", "messages": [msg(5)], "more": False})
    texts = [
        e.text if e.kind != EntryKind.MESSAGE else e.id for e in model.window("#lobby").lines()
    ]
    assert texts == [5, "#lobby: 2 here: alice, bob"]


def test_a_refused_send_stays_visible_as_undelivered() -> None:
    model = ChatModel("alice", "lobby")
    model.add_pending("c1", "#lobby", "hello", False)
    model.apply({"type": "error", "code": "body_invalid", "message": "too long", "cid": "c1"})
    [entry] = model.window("#lobby").lines()
    assert (entry.kind, entry.note) == (EntryKind.FAILED, "too long")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/j dev", Command("/join", "dev")),
        ("/q bob", Command("/query", "bob")),
        ("/wc", Command("/close", "")),
        ("/win 3", Command("/window", "3")),
        ("/win x", Invalid("usage: /window N")),
        ("/hilight deploy", Command("/highlight", "deploy")),
        ("/bye", Command("/quit", "")),
    ],
)
def test_parse_aliases(line: str, expected: object) -> None:
    assert parse(line) == expected


def test_help_lists_every_command_alias_and_key() -> None:
    from chat_client.commands import KEYS, SPECS, help_lines

    text = "\n".join(help_lines())
    for spec in SPECS:
        assert spec.usage in text
        assert all(alias in text for alias in spec.aliases)
    assert all(key in text for key, _ in KEYS)


def test_settings_round_trip_and_survive_a_broken_file(tmp_path: Any) -> None:
    from chat_client.settings import Settings

    settings = Settings(tmp_path)
    settings.set_rooms("ws://a", ["lobby", "dev"])
    settings.set_words("ignore", ["mallory"])
    again = Settings(tmp_path)
    assert again.rooms("ws://a") == ["lobby", "dev"]
    assert again.rooms("ws://b") == []
    assert again.words("ignore") == ["mallory"]
    (tmp_path / "settings.json").write_text("{not json")
    broken = Settings(tmp_path)
    assert broken.rooms("ws://a") == [] and broken.problem


def test_secret_store_proposes_keeps_and_discards(tmp_path: Any) -> None:
    from chat_client.secrets import SecretStore, SecretStoreError

    store = SecretStore(tmp_path)
    secret = store.propose("epoch-e1", "newbie", "ws://a:1")
    assert len(secret) == 43 and store.get("epoch-e1", "NEWBIE") == secret
    assert store.urls("epoch-e1", "newbie") == ["ws://a:1"], "trusted where it is proposed"
    assert not store.trusted("epoch-e1", "newbie", "ws://b:1")
    store.trust("epoch-e1", "newbie", "ws://b:1")
    store.trust("epoch-e1", "newbie", "ws://b:1")
    assert store.urls("epoch-e1", "newbie") == ["ws://a:1", "ws://b:1"]
    assert store.get("epoch-e1", "newbie") == secret, "the URL list is not a secret"
    store.discard("epoch-e1", "newbie")
    assert store.get("epoch-e1", "newbie") is None
    assert store.urls("epoch-e1", "newbie") == [], "forgotten with the secret"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SecretStoreError, match="cannot keep your nick's secret"):
        SecretStore(tmp_path / "file").propose("epoch-e1", "newbie", "ws://a:1")


def test_a_429_retry_after_is_a_floor_for_the_next_try() -> None:
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    from chat_client.connection import _retry_after

    def status(code: int, retry: str | None) -> InvalidStatus:
        headers = Headers({"Retry-After": retry} if retry else {})
        return InvalidStatus(Response(code, "x", headers))

    assert _retry_after(status(429, "7")) == 7.0
    assert _retry_after(status(429, "99999")) == 300.0
    assert _retry_after(status(429, None)) == 0.0
    assert _retry_after(status(503, "7")) == 0.0
    assert _retry_after(OSError()) == 0.0


async def draw(model: ChatModel, tmp_path: Any, cols: int = 40, rows: int = 6) -> str:
    """What the real full-screen UI writes to a terminal when it first draws ``model``."""
    out = io.StringIO()
    output = Vt100_Output(out, lambda: Size(rows=rows, columns=cols), term="xterm")
    conn = ChatConnection(
        "ws://127.0.0.1:9/",
        model.nick,
        ["lobby"],
        SecretStore(tmp_path),
        on_frame=lambda f: None,
        on_status=lambda s: None,
    )
    first: list[str] = []
    with create_pipe_input() as pipe:
        ui = ChatUI(model, Controller(model, conn), input=pipe, output=output)

        def drawn(_: object) -> None:
            if not first:
                first.append(out.getvalue())
                ui.exit()

        ui.app.after_render += drawn
        await ui.run()
    return first[0]


MARKS = {
    "acute after a letter": "e7 qa\u0301",
    "enclosing circle": "Z\u20dd",
    "enclosing keycap": "1\u20e3",
    "cyrillic hundred thousands": "Z\u0488",
    "only the mark": "\u20dd",
    "wide letter, then the mark": "日\u0301",
    "a letter after the mark": "Z\u20dd|",
    "line wrapped after the mark": "wrapped\u0301 " + "w" * 25,
    "line as wide as the window": "x" * 28 + "\u0301",
}


@pytest.mark.parametrize("name", list(MARKS))
@pytest.mark.parametrize("action", [False, True], ids=["say", "me"])
async def test_a_combining_mark_is_drawn_once_wherever_it_ends_a_line(
    name: str, action: bool, tmp_path: Any
) -> None:
    """prompt_toolkit leaves a line's last zero-width character in the cell after it too:
    unless something is drawn there, the terminal showed ``qá`` as ``qá́`` (attack-r4 F3)."""
    body = MARKS[name]
    model = ChatModel("alice", "lobby")
    model.apply(msg(1, body, sender="bob", action=action))
    raw = await draw(model, tmp_path)
    for mark in "\u0301\u20dd\u20e3\u0488":
        assert raw.count(mark) == body.count(mark), f"{mark!r} drawn {raw.count(mark)} times"
    screen = pyte.Screen(40, 6)
    pyte.Stream(screen).feed(raw)
    # Read back by a terminal, too: pyte drops an enclosing mark (combining class 0) and
    # one after a wide letter, so only an acute on a narrow letter.
    if re.search("[a-z]\u0301", body):
        shown = unicodedata.normalize("NFD", "\n".join(screen.display))  # pyte composes
        assert shown.count("\u0301") == 1, shown
        assert re.search("[^ ]\u0301", shown), f"the mark lost its letter: {shown}"


def test_the_client_checks_room_names_as_typed_before_lower_casing(tmp_path: Any) -> None:
    """/rooms and /switch lower-cased first: U+212A KELVIN SIGN became ``k`` (attack-r4 F7)."""
    model = ChatModel("alice", "lobby")
    model.apply({"type": "joined", "room": "k", "members": ["alice"]})
    conn = ChatConnection(
        "ws://127.0.0.1:9/",
        "alice",
        ["lobby"],
        SecretStore(tmp_path),
        on_frame=lambda f: None,
        on_status=lambda s: None,
    )
    sent: list[dict[str, Any]] = []
    conn.request = lambda frame: sent.append(frame) is None  # type: ignore[method-assign]
    controller = Controller(model, conn)
    controller.submit("/rooms \u212a")
    assert sent == [] and "a room name is" in model.window(model.active).lines()[-1].text
    controller.submit("/rooms #Dev")
    assert sent == [{"type": "rooms", "limit": 100, "after": "dev"}]
    model.switch("#lobby")
    controller.submit("/switch #\u212a")
    assert model.active == "#lobby"
    controller.submit("/switch K")
    assert model.active == "#k"
