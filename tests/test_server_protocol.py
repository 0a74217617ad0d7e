"""What docs/protocol.md promises, checked request by request against a real server:
reply order, what errors carry, secrets and takeovers, the epoch, budgets and paging,
presence."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import NO_LIMITS, Frame, Peer, peer, server, url
from tests.stores import db_on_both_stores, db_rows, writes_blocked  # noqa: F401 (db: SQLite and PostgreSQL)


def compact(value: object) -> bytes:
    """The bytes the server sends for a JSON value."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


async def reply(p: Peer, kind: str, **fields: object) -> Frame:
    """The next reply of this kind, past live traffic (msg, presence)."""
    while True:
        frame = await p.recv()
        if frame["type"] in ("msg", "presence") and kind not in ("msg", "presence"):
            continue
        assert frame["type"] == kind, f"expected {kind}, got {frame}"
        for key, value in fields.items():
            assert frame.get(key) == value, f"{key}: expected {value!r} in {frame}"
        return frame


async def test_history_right_after_a_send_contains_it(db: Path) -> None:
    """Replies keep request order, acks included (was: 10 of 10 histories lacked it)."""
    async with server(db) as chat, peer(chat, "alice") as alice:
        for n in range(10):
            await alice.send({"type": "send", "cid": f"c{n}", "room": "lobby", "body": f"m{n}"})
            await alice.send({"type": "history", "room": "lobby", "limit": 1, "ref": f"h{n}"})
            replies = [f for f in await alice.until("history") if f["type"] != "msg"]
            assert [f["type"] for f in replies] == ["ack", "history"]
            assert replies[1]["messages"][0]["cid"] == f"c{n}"


async def test_replies_come_in_request_order(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice, peer(chat, "bob") as bob:
        await bob.quiet(0.2)
        frames = [
            {"type": "send", "cid": "a", "room": "lobby", "body": "1", "ref": "r1"},
            {"type": "who", "ref": "r2"},
            {"type": "send", "cid": "b", "room": "nowhere", "body": "2", "ref": "r3"},
            {"type": "send", "cid": "c", "to": "bob", "body": "3", "ref": "r4"},
            {"type": "leave", "room": "nowhere", "ref": "r5"},
            {"type": "send", "cid": "d", "room": "lobby", "body": "   ", "ref": "r6"},
            {"type": "rooms", "ref": "r7"},
            {"type": "send", "cid": "e", "room": "lobby", "body": "5", "ref": "r8"},
        ]
        for frame in frames:
            await alice.send(frame)
        await alice.ws.send("{oops")
        await alice.send({"type": "history", "room": "lobby", "ref": "r9"})
        replies = [f for f in await alice.until("history") if f["type"] not in ("msg", "presence")]
        assert [(f["type"], f.get("ref")) for f in replies] == [
            ("ack", "r1"),
            ("members", "r2"),
            ("error", "r3"),
            ("ack", "r4"),
            ("error", "r5"),
            ("error", "r6"),
            ("rooms", "r7"),
            ("ack", "r8"),
            ("error", None),
            ("history", "r9"),
        ]
        # Every error about a send carries its cid and ref; acks carry ref.
        assert replies[2]["code"] == "not_in_room" and replies[2]["cid"] == "b"
        assert replies[5]["code"] == "body_invalid" and replies[5]["cid"] == "d"
        assert replies[8]["code"] == "bad_json"
        assert [m["cid"] for m in replies[9]["messages"]] == ["a", "e"]


async def test_errors_about_a_send_carry_cid_and_ref(db: Path) -> None:
    async with server(db, rate=1.0, burst=3, flood_strikes=100) as chat:
        # The msg of "ok" may come after its ack (docs/protocol.md; on PostgreSQL it comes
        # through the stream): reply() looks past it.
        async with peer(chat, "alice") as alice:  # hello took one token of three
            await alice.send(
                {"type": "send", "cid": "ok", "room": "lobby", "body": "x", "ref": "1"}
            )
            await reply(alice, "ack", cid="ok", ref="1")
            await alice.send(
                {"type": "send", "cid": "nobody", "to": "zed", "body": "x", "ref": "2"}
            )
            await reply(alice, "error", code="no_such_nick", cid="nobody", ref="2")
            await alice.send(
                {"type": "send", "cid": "fast", "room": "lobby", "body": "y", "ref": "3"}
            )
            error = await reply(alice, "error", code="rate_limited", cid="fast", ref="3")
            assert 0 < error["retry_after"] <= 1.0
            assert "connection" in error["message"]
            await alice.send({"type": "send", "cid": "bad cid", "room": "lobby", "body": "z"})
            error = await alice.expect("error", code="rate_limited")
            assert "cid" not in error  # not a valid cid: nothing to echo


async def test_invalid_ref_is_refused_with_bad_frame(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice:
        for ref in ("r" * 65, "", 12, ["x"], "\ud800"):
            await alice.send(
                {"type": "send", "cid": "c1", "room": "lobby", "body": "x", "ref": ref}
            )
            error = await alice.expect("error", code="bad_frame")
            assert "ref" not in error and error["cid"] == "c1"
        assert [f for f in await alice.quiet(0.2) if f["type"] in ("msg", "ack")] == []
        await alice.send(
            {"type": "send", "cid": "c1", "room": "lobby", "body": "x", "ref": "r" * 64}
        )
        await reply(alice, "ack", cid="c1", ref="r" * 64)
    assert await db_rows(db, "SELECT COUNT(*) FROM messages") == [(1,)]


async def test_hello_with_history_zero_still_sends_every_history(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "bob", rooms=["lobby", "dev"]) as bob:
            await bob.say("in lobby")
            secret = bob.welcome["secret"]
        async with peer(chat, "bob", secret=secret, rooms=["lobby", "dev"], history=0) as bob:
            histories = [f for f in bob.catchup if f["type"] == "history"]
            assert histories == [
                {"type": "history", "room": "lobby", "messages": [], "more": True},
                {"type": "history", "room": "dev", "messages": [], "more": False},
                {"type": "history", "direct": True, "messages": [], "more": False},
            ]


async def test_the_handshake_names_the_database_epoch_before_hello(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat) as anonymous:
            assert anonymous.ws.response is not None
            epoch = anonymous.ws.response.headers["Chat-Epoch"]
        async with peer(url(chat) + "/other/path", "bob") as bob:
            assert bob.ws.response is not None
            assert bob.ws.response.headers["Chat-Epoch"] == epoch == bob.welcome["epoch"]


async def test_secrets_proposed_generated_and_refused(db: Path) -> None:
    proposed = "p" + uuid.uuid4().hex  # 33 characters
    async with server(db) as chat:
        async with peer(chat) as p:
            await p.send({"type": "hello", "nick": "alice", "secret": proposed})
            welcome = await p.expect("welcome")
            assert welcome["registered"] is True and "secret" not in welcome
            await p.until("synced")
            await p.send({"type": "nick", "nick": "alice2", "secret": "short", "ref": "n"})
            error = await p.expect("error", code="bad_frame", ref="n")
            assert "22" in error["message"]
            await p.send({"type": "nick", "nick": "alice3"})
            renamed = await p.expect("renamed")
            assert renamed["registered"] is True and len(renamed["secret"]) == 32
        async with peer(chat, "alice", secret=proposed) as back:
            assert "registered" not in back.welcome and "secret" not in back.welcome
        # The lone surrogate that once stopped every write: refused, and nothing stops.
        async with peer(chat) as p:
            await p.ws.send('{"type":"hello","nick":"alice","secret":"\\ud800"}')
            await p.expect("error", code="bad_frame")
            await p.send({"type": "hello", "nick": "alice", "secret": proposed})
            await p.expect("welcome")
            await p.until("synced")
            await p.ws.send('{"type":"nick","nick":"alice3","secret":"\\ud800"}')
            await p.expect("error", code="bad_frame")
            await p.say("writes still work")


async def test_takeover_false_refuses_and_4001_names_the_address(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice", rooms=["a", "b"]) as first:
        secret = first.welcome["secret"]
        async with peer(chat) as second:
            hello = {"type": "hello", "nick": "alice", "secret": secret, "takeover": False}
            await second.send({**hello, "ref": "h"})
            error = await second.expect("error", code="nick_in_use", ref="h")
            assert "alice" in error["message"]
            await first.say("still mine", room="a")
            await second.send({**hello, "takeover": True})
            await second.expect("welcome")
            with pytest.raises(ConnectionClosed) as closed:
                await first.until("never")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            assert closed.value.rcvd.reason == "replaced: this nick connected again from 127.0.0.1"


async def test_takeover_announces_only_rooms_entered_or_left(db: Path) -> None:
    async with server(db) as chat, peer(chat, "watch", rooms=["a", "b", "c"]) as watch:
        async with peer(chat, "alice", rooms=["a", "b"]) as first:
            secret = first.welcome["secret"]
            await asyncio.sleep(0.3)
            await watch.quiet(0.2)
            async with peer(chat, "alice", secret=secret, rooms=["b", "c"]):
                events = [f for f in await watch.quiet(0.5) if f["type"] == "presence"]
                got = {(f["event"], f["room"], tuple(f["nicks"])) for f in events}
                assert got == {("leave", "a", ("alice",)), ("join", "c", ("alice",))}
                assert all(f["nick"] == "alice" for f in events)


async def test_one_nick_one_session_when_hellos_race(db: Path) -> None:
    """Eight hellos with the right secret at once: one session lives, seven get 4001."""
    async with server(db, **NO_LIMITS) as chat:
        async with peer(chat, "alice") as first:
            secret = first.welcome["secret"]
        async with (
            connect(url(chat)) as a,
            connect(url(chat)) as b,
            connect(url(chat)) as c,
            connect(url(chat)) as d,
            connect(url(chat)) as e,
            connect(url(chat)) as f,
            connect(url(chat)) as g,
            connect(url(chat)) as h,
        ):
            peers = [Peer(ws) for ws in (a, b, c, d, e, f, g, h)]
            hello = {"type": "hello", "nick": "alice", "secret": secret, "rooms": ["new-room"]}
            await asyncio.gather(*(p.send(hello) for p in peers))
            await asyncio.sleep(1.0)
            live = [p for p in peers if p.ws.close_code is None]
            assert len(live) == 1
            assert all(p.ws.close_code == 4001 for p in peers if p is not live[0])
            assert chat.hub.online["alice"].link.remote.endswith(f":{live[0].ws.local_address[1]}")
            await live[0].until("synced")
            await live[0].say("the one live session", room="new-room")


async def test_epoch_stays_across_restarts_and_changes_with_a_new_database(
    db: Path, tmp_path: Path
) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice:
        epoch = alice.welcome["epoch"]
        assert isinstance(epoch, str) and epoch
    async with server(db) as chat, peer(chat, "bob") as bob:
        assert bob.welcome["epoch"] == epoch
    async with server(tmp_path / "other.db") as chat, peer(chat, "bob") as bob:
        assert bob.welcome["epoch"] != epoch


async def test_history_frames_fit_budgets_and_paging_reaches_everything(db: Path) -> None:
    """Max-size multibyte bodies: every frame fits a default client's 1 MiB, nothing is lost."""
    body = "\U0001f600" * 4000  # 16 KB of UTF-8
    async with server(db, **NO_LIMITS) as chat:
        async with peer(chat, "filler", rooms=["big"]) as filler:
            ids = [(await filler.say(body, room="big"))["id"] for _ in range(60)]
        async with connect(url(chat)) as ws:  # websockets' default max_size: 1 MiB
            p = Peer(ws)
            await p.send({"type": "hello", "nick": "reader", "rooms": ["big"], "history": 200})
            frames = await p.until("synced")
            first = next(f for f in frames if f.get("room") == "big" and f["type"] == "history")
            limits = frames[0]["limits"]
            assert len(compact(first)) <= 1024 * 1024
            seen = [m["id"] for m in first["messages"]]
            assert seen == ids[-len(seen) :] and first["more"] is True
            share = limits["catchup_bytes"] // 2
            assert len(compact(first["messages"])) <= share
            while first["more"]:
                await p.send({"type": "history", "room": "big", "before": seen[0], "limit": 200})
                first = await p.expect("history")
                assert first["messages"], "more: true promises older messages"
                assert len(compact(first["messages"])) <= limits["history_bytes"]
                seen = [m["id"] for m in first["messages"]] + seen
            assert seen == ids


async def test_a_reading_client_is_never_dropped_for_its_own_catch_up(db: Path) -> None:
    """A catch-up far over the send buffer limit, to a client that reads through a small
    window: paced by its reading, not dropped as too slow (was: dropped 2 of 3 times)."""
    body = "\U0001f600" * 4000  # 16 KB
    rooms = [f"r{n}" for n in range(8)]
    async with server(db, **{**NO_LIMITS, "send_buffer_limit": 16 * 1024}) as chat:
        async with peer(chat, "filler", rooms=rooms) as filler:
            for room in rooms:
                for _ in range(50):
                    await filler.say(body, room=room)
        for nick, hello in (("reader", {"history": 200}), ("resumer", {"resume": 0})):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", chat.port))
            async with connect(url(chat), sock=sock, max_size=None) as ws:
                reader = Peer(ws)
                await reader.send({"type": "hello", "nick": nick, "rooms": rooms, **hello})
                frames = []
                while not frames or frames[-1]["type"] != "synced":
                    frames.append(await reader.recv())
                    await asyncio.sleep(0.002)  # a slow but steady reader
                if "history" in hello:
                    histories = [f for f in frames if f["type"] == "history" and "room" in f]
                    assert [h["room"] for h in histories] == rooms
                    assert all(h["messages"] for h in histories)
                else:
                    ids = [f["id"] for f in frames if f["type"] == "msg"]
                    assert len(ids) > 30 and ids == sorted(ids)
                await reader.say("still connected", room="r0")


async def test_direct_history_pages_across_conversations(db: Path) -> None:
    async with server(db, **NO_LIMITS) as chat:
        async with peer(chat, "alice") as alice, peer(chat, "bob"), peer(chat, "carol"):
            sent = []
            for n in range(7):
                sent.append((await alice.say(f"dm{n}", to="bob" if n % 2 else "carol"))["id"])
            await alice.quiet(0.2)
            got: list[int] = []
            before = None
            while True:
                request = {"type": "history", "direct": True, "limit": 3, "ref": "d"}
                if before is not None:
                    request["before"] = before
                await alice.send(request)
                page = await alice.expect("history", ref="d")
                assert page["direct"] is True and "room" not in page and "with" not in page
                got = [m["id"] for m in page["messages"]] + got
                if not page["more"]:
                    break
                before = page["messages"][0]["id"]
            assert got == sent


async def test_rooms_pages_by_name(db: Path) -> None:
    async with server(db, **NO_LIMITS) as chat, peer(chat, "alice") as alice:
        names = sorted(f"room{n:03d}" for n in range(250))
        for start in range(0, 250, 25):
            for name in names[start : start + 25]:
                await alice.send({"type": "join", "room": name})
            for _ in names[start : start + 25]:
                await alice.until("history")
            for name in names[start : start + 25]:
                await alice.send({"type": "leave", "room": name})
                await alice.expect("left", room=name)
        listed: list[str] = []
        after = None
        while True:
            request = {"type": "rooms", "limit": 100}
            if after is not None:
                request["after"] = after
            await alice.send(request)
            page = await alice.expect("rooms")
            listed += [r["name"] for r in page["rooms"]]
            if not page["more"]:
                break
            after = page["rooms"][-1]["name"]
        assert listed == sorted([*names, "lobby"])


async def test_presence_is_coalesced_with_every_nick(db: Path) -> None:
    async with server(db, **NO_LIMITS) as chat, peer(chat, "watch") as watch:
        async with (
            peer(chat, "p1") as p1,
            peer(chat, "p2"),
            peer(chat, "p3"),
        ):
            frames = [f for f in await watch.quiet(0.4) if f["type"] == "presence"]
            assert [n for f in frames for n in f["nicks"]] == ["p1", "p2", "p3"]
            assert len(frames) < 3 or all(len(f["nicks"]) == 1 for f in frames)
            for f in frames:
                assert f["event"] == "join" and f["room"] == "lobby"
                assert ("nick" in f) == (len(f["nicks"]) == 1)
            # p1 never hears of its own join, only of those after its members list.
            own = [f for f in await p1.quiet(0.3) if f["type"] == "presence"]
            joined = next(f for f in p1.catchup if f["type"] == "joined")
            assert not any("p1" in f["nicks"] for f in own)
            assert set(joined["members"]) | {n for f in own for n in f["nicks"]} == {
                "watch",
                "p1",
                "p2",
                "p3",
            }
        frames = [f for f in await watch.quiet(0.4) if f["type"] == "presence"]
        assert sorted(n for f in frames for n in f["nicks"]) == ["p1", "p2", "p3"]
        assert all(f["event"] == "leave" for f in frames)


async def test_presence_comes_before_a_message_from_the_new_member(db: Path) -> None:
    async with server(db) as chat, peer(chat, "watch") as watch, peer(chat, "bob") as bob:
        await bob.say("hi")
        frames = await watch.until("msg")
        assert [f["type"] for f in frames] == ["presence", "msg"]


async def test_a_backlog_pauses_reading_then_everything_is_answered_in_order(db: Path) -> None:
    """Hundreds of requests behind a send the database holds up: the server stops reading,
    then answers all of them in order; a paused session that is replaced ends at once."""
    secret = "b" + uuid.uuid4().hex  # proposed: confirmed at once, checked without a write
    async with server(db, **NO_LIMITS) as chat:
        async with peer(chat, "alice") as alice, peer(chat, "bob", secret=secret) as bob:
            assert chat.server is not None
            async with writes_blocked(db):
                for p in (alice, bob):
                    await p.send({"type": "send", "cid": "held", "room": "lobby", "body": "x"})
                    for n in range(400):
                        await p.send({"type": "who", "ref": str(n)})
                await asyncio.sleep(0.5)
                connections = len(chat.server.connections)
                # bob comes back elsewhere: his paused session is closed and its connection
                # ends, without waiting for the database or the close timeout.
                async with peer(chat, "bob", secret=secret, history=0):
                    assert await bob.closed() == 4001
                    await asyncio.sleep(0.3)
                    assert len(chat.server.connections) == connections
            frames = await alice.until("members", timeout=10)
            answers = [f for f in frames if f["type"] not in ("msg", "presence")]
            assert [f["type"] for f in answers] == ["ack", "members"]
            refs = [answers[1]["ref"]]
            while len(refs) < 400:
                refs.append((await reply(alice, "members"))["ref"])
            assert refs == [str(n) for n in range(400)]


async def test_a_room_name_outside_the_rules_is_refused_as_sent(db: Path) -> None:
    """U+212A KELVIN SIGN lower-cases to ``k``: it was joined as room ``k`` (attack-r4 F7)."""
    async with server(db) as chat, peer(chat, "alice") as alice:
        for n, room in enumerate(["\u212a", "#\u212a", "\u212aelvin", "\u0130"]):
            await alice.send({"type": "join", "room": room, "ref": f"j{n}"})
            await reply(alice, "error", code="room_invalid", ref=f"j{n}")
        await alice.send({"type": "rooms"})
        assert [r["name"] for r in (await reply(alice, "rooms"))["rooms"]] == ["lobby"]
        await alice.send({"type": "join", "room": "#K"})  # ASCII upper case is fine
        await reply(alice, "joined", room="k")
        await reply(alice, "history", room="k")
        await alice.send({"type": "rooms"})
        assert [r["name"] for r in (await reply(alice, "rooms"))["rooms"]] == ["k", "lobby"]
