"""The server against real websocket clients, on port 0, on each store (a real SQLite
file, a real PostgreSQL database: ``tests/stores.py``)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import NO_LIMITS, Frame, Peer, peer, server, url
from tests.stores import (  # noqa: F401 (db: SQLite and PostgreSQL)
    db_on_both_stores,
    db_rows,
    writes_refused,
)


async def test_hello_welcome_secret_lobby_and_history(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "alice") as alice:
            assert alice.welcome["nick"] == "alice"
            assert len(alice.welcome["secret"]) >= 32
            assert alice.welcome["limits"]["max_body_chars"] == 4000
            joined = alice.catchup[0]
            assert joined == {"type": "joined", "room": "lobby", "members": ["alice"]}
            for n in range(3):
                await alice.say(f"line {n}")
        async with peer(chat, "bob", history=2) as bob:
            history = next(f for f in bob.catchup if f["type"] == "history" and f.get("room"))
            assert [m["body"] for m in history["messages"]] == ["line 1", "line 2"]
            assert history["more"] is True
            assert bob.catchup[-1] == {"type": "synced"}


async def test_live_history_and_id_order_agree_for_every_client(db: Path) -> None:
    async with (
        server(db) as chat,
        peer(chat, "a") as a,
        peer(chat, "b") as b,
        peer(chat, "c") as c,
        peer(chat, "watcher") as w,
    ):
        await a.quiet(0.2)
        await b.quiet(0.2)
        await c.quiet(0.2)
        await w.quiet(0.2)

        async def burst(p: Peer, name: str) -> None:
            for n in range(30):
                await p.send(
                    {"type": "send", "cid": f"{name}{n}", "room": "lobby", "body": f"{name}{n}"}
                )

        await asyncio.gather(burst(a, "a"), burst(b, "b"), burst(c, "c"))
        seen: dict[str, list[int]] = {}
        for name, p in (("a", a), ("b", b), ("c", c), ("w", w)):
            ids: list[int] = []
            while len(ids) < 90:
                frame = await p.recv()
                if frame["type"] == "msg":
                    ids.append(frame["id"])
            seen[name] = ids
        assert seen["a"] == seen["b"] == seen["c"] == seen["w"]
        assert seen["w"] == sorted(seen["w"])
        await w.send({"type": "history", "room": "lobby", "limit": 200, "ref": "h"})
        history = await w.expect("history", ref="h")
        assert [m["id"] for m in history["messages"]] == seen["w"]
    stored = [r[0] for r in await db_rows(db, "SELECT id FROM messages ORDER BY id")]
    assert stored == seen["w"]


async def test_ack_comes_after_commit(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice:
        ack = await alice.say("durable")
        # Read through another connection, as a fresh process would after a crash.
        found = await db_rows(db, "SELECT id, body FROM messages WHERE cid = ?", ack["cid"])
        assert found == [(ack["id"], "durable")]


async def test_retry_of_same_cid_stores_nothing_new(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "alice") as alice, peer(chat, "bob") as bob:
            first = await alice.say("once", cid="fixed-id")
            again = await alice.say("once", cid="fixed-id")
            assert again["id"] == first["id"] and again["ts"] == first["ts"]
            msgs = [f for f in await bob.quiet() if f["type"] == "msg"]
            assert [m["id"] for m in msgs] == [first["id"]]
        # After a reconnect too.
        async with peer(chat, "alice", secret=alice.welcome["secret"]) as alice2:
            third = await alice2.say("once", cid="fixed-id")
            assert third["id"] == first["id"]
    assert await db_rows(db, "SELECT COUNT(*) FROM messages") == [(1,)]


async def test_same_cid_twice_in_one_batch(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice:
        frame = {"type": "send", "cid": "dup", "room": "lobby", "body": "x"}
        await alice.send(frame)
        await alice.send(frame)
        frames = await alice.quiet(0.5)
        acks = [f for f in frames if f["type"] == "ack"]
        assert len(acks) == 2 and acks[0]["id"] == acks[1]["id"]
        assert len([f for f in frames if f["type"] == "msg"]) == 1
    assert await db_rows(db, "SELECT COUNT(*) FROM messages") == [(1,)]


async def test_nicks_cannot_be_stolen(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "Alice") as alice:
            secret = alice.welcome["secret"]
        async with peer(chat) as thief:
            for claim in ({"nick": "alice"}, {"nick": "ALICE", "secret": "guess"}):
                await thief.send({"type": "hello", **claim})
                error = await thief.expect("error", code="nick_taken")
                assert "secret" in error["message"]
            # The refused connection can still pick a free nick.
            await thief.send({"type": "hello", "nick": "mallory"})
            assert (await thief.expect("welcome"))["nick"] == "mallory"
            await thief.until("synced")
            await thief.send({"type": "nick", "nick": "alice"})
            await thief.expect("error", code="nick_taken")
        async with peer(chat, "aLiCe", secret=secret) as back:
            assert back.welcome["nick"] == "Alice"  # the registered spelling
            assert "secret" not in back.welcome


async def test_reconnect_with_secret_replaces_old_connection(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as first:
        async with peer(chat, "alice", secret=first.welcome["secret"]) as second:
            with pytest.raises(ConnectionClosed) as closed:
                await first.until("never")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            await second.say("still here")


async def test_direct_messages_are_private(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "alice") as alice, peer(chat, "bob") as bob, peer(chat, "eve") as eve:
            await alice.send({"type": "send", "cid": "d1", "to": "Bob", "body": "secret plan"})
            got = await bob.expect("msg")
            assert got["to"] == "bob" and got["from"] == "alice" and "room" not in got
            echo = [f for f in await alice.quiet() if f["type"] == "msg"]
            assert echo and echo[0]["id"] == got["id"]
            assert [f for f in await eve.quiet() if f["type"] == "msg"] == []
            # Eve cannot read it through history, whichever way she asks.
            for other in ("alice", "bob", "eve"):
                await eve.send({"type": "history", "with": other, "ref": other})
                reply = await eve.expect("history", ref=other)
                assert reply["messages"] == []
            await bob.send({"type": "history", "with": "alice", "ref": "b"})
            assert [m["body"] for m in (await bob.expect("history"))["messages"]] == ["secret plan"]
            await alice.send({"type": "send", "cid": "d2", "to": "nobody", "body": "x"})
            await alice.expect("error", code="no_such_nick", cid="d2")
        # Nor through resume or a fresh start under her own nick.
        async with peer(chat, "eve", secret=eve.welcome["secret"], resume=0) as eve2:
            assert [f for f in eve2.catchup if f["type"] == "msg"] == []
        async with peer(chat, "bob", secret=bob.welcome["secret"]) as bob2:
            dms = next(f for f in bob2.catchup if f.get("direct"))
            assert [m["body"] for m in dms["messages"]] == ["secret plan"]


async def test_rooms_join_leave_who_and_presence(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "alice") as alice, peer(chat, "bob") as bob:
            await alice.expect("presence", event="join", nick="bob", room="lobby")
            await bob.send({"type": "join", "room": "#Dev", "ref": "j"})
            joined = await bob.expect("joined", room="dev", ref="j")
            assert joined["members"] == ["bob"]
            await bob.expect("history", room="dev")
            await alice.send({"type": "join", "room": "dev"})
            await alice.expect("joined", room="dev")
            await alice.expect("history", room="dev")
            await bob.expect("presence", event="join", room="dev", nick="alice")
            await bob.send({"type": "who", "room": "dev", "ref": "w"})
            assert (await bob.expect("members", ref="w"))["nicks"] == ["alice", "bob"]
            await bob.send({"type": "rooms"})
            listed = (await bob.expect("rooms"))["rooms"]
            assert {"name": "dev", "members": 2} in listed
            await bob.send({"type": "leave", "room": "dev"})
            await bob.expect("left", room="dev")
            await alice.expect("presence", event="leave", room="dev", nick="bob")
            await bob.send({"type": "send", "cid": "x", "room": "dev", "body": "hi"})
            await bob.expect("error", code="not_in_room", cid="x")
            await bob.send({"type": "nick", "nick": "robert"})
            renamed = await bob.expect("renamed", old="bob", nick="robert")
            assert renamed["secret"]
            await alice.expect("presence", event="rename", room="lobby", old="bob", nick="robert")
        async with peer(chat, "carol") as carol:
            await carol.send({"type": "who"})
            assert (await carol.expect("members"))["nicks"] == ["carol"]


async def test_history_paging(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice:
        ids = [(await alice.say(f"m{n}"))["id"] for n in range(7)]
        await alice.quiet(0.2)
        await alice.send({"type": "history", "room": "lobby", "limit": 3})
        page = await alice.expect("history")
        assert [m["id"] for m in page["messages"]] == ids[4:] and page["more"] is True
        await alice.send({"type": "history", "room": "lobby", "limit": 3, "before": ids[4]})
        page = await alice.expect("history")
        assert [m["id"] for m in page["messages"]] == ids[1:4]
        await alice.send({"type": "history", "room": "lobby", "limit": 3, "before": ids[1]})
        page = await alice.expect("history")
        assert [m["id"] for m in page["messages"]] == ids[:1] and page["more"] is False


async def test_resume_replays_exactly_what_was_missed(db: Path) -> None:
    async with server(db) as chat:
        async with peer(chat, "alice", rooms=["lobby", "dev"]) as alice:
            secret = alice.welcome["secret"]
            last = (await alice.say("seen"))["id"]
        async with peer(chat, "bob", rooms=["lobby", "dev", "other"]) as bob:
            for room in ("lobby", "dev", "other", "lobby"):
                await bob.say(f"missed in {room}", room=room)
            await bob.say("dm", to="alice")
        async with peer(chat, "alice", secret=secret, rooms=["lobby", "dev"], resume=last) as a:
            replay = [f for f in a.catchup if f["type"] == "msg"]
            bodies = [m["body"] for m in replay]
            assert bodies == ["missed in lobby", "missed in dev", "missed in lobby", "dm"]
            assert [m["id"] for m in replay] == sorted(m["id"] for m in replay)
            assert not [f for f in a.catchup if f["type"] in ("gap", "history")]


async def test_resume_past_the_cap_says_gap(db: Path) -> None:
    async with server(db, resume_cap=5) as chat:
        async with peer(chat, "alice") as alice:
            secret = alice.welcome["secret"]
        async with peer(chat, "bob") as bob:
            ids = [(await bob.say(f"m{n}"))["id"] for n in range(8)]
        async with peer(chat, "alice", secret=secret, resume=0) as alice:
            gap = alice.catchup[1]
            assert gap == {"type": "gap", "after": 0, "before": ids[3]}
            assert [f["id"] for f in alice.catchup if f["type"] == "msg"] == ids[3:]


async def test_resume_race_with_concurrent_senders(db: Path) -> None:
    """While the replay runs, others keep sending: no gap and no duplicate."""
    async with server(db, **NO_LIMITS) as chat:
        async with peer(chat, "alice") as alice:
            secret = alice.welcome["secret"]
            last = (await alice.say("start"))["id"]
        stop = asyncio.Event()
        sent_ids: list[int] = []

        async def sender(name: str) -> None:
            async with peer(chat, name) as p:
                n = 0
                while not stop.is_set() or n < 20:
                    sent_ids.append((await p.say(f"{name}-{n}"))["id"])
                    n += 1

        senders = [asyncio.create_task(sender(f"s{i}")) for i in range(3)]
        while len(sent_ids) < 30:
            await asyncio.sleep(0.01)
        received: list[int] = []
        async with peer(chat, "alice", secret=secret, resume=last) as a:
            received += [f["id"] for f in a.catchup if f["type"] == "msg"]
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*senders)
            received += [f["id"] for f in await a.quiet(0.5) if f["type"] == "msg"]
        assert received == sorted(set(received)), "duplicate or out of order"
        assert received == sorted(sent_ids)


async def test_join_during_traffic_has_no_gap_or_duplicate(db: Path) -> None:
    async with server(db, **NO_LIMITS) as chat:
        stop = asyncio.Event()
        sent: list[int] = []

        async def chatter() -> None:
            async with peer(chat, "talker", rooms=["busy"]) as p:
                n = 0
                while not stop.is_set():
                    sent.append((await p.say(f"t{n}", room="busy"))["id"])
                    n += 1

        task = asyncio.create_task(chatter())
        while len(sent) < 10:
            await asyncio.sleep(0.01)
        async with peer(chat, "joiner") as j:
            await j.send({"type": "join", "room": "busy"})
            await j.expect("joined", room="busy")
            history = await j.expect("history", room="busy")
            got = [m["id"] for m in history["messages"]]
            await asyncio.sleep(0.3)
            stop.set()
            await task
            got += [f["id"] for f in await j.quiet(0.5) if f["type"] == "msg"]
        assert got == sorted(set(got))
        assert got == sent[-len(got) :] and len(got) > len(history["messages"])


def _message_ids(frames: list[Frame]) -> list[int]:
    """The ids of the messages in these frames, in order: ``msg`` frames and the
    messages of ``history`` frames."""
    ids: list[int] = []
    for frame in frames:
        if frame["type"] == "msg":
            ids.append(frame["id"])
        elif frame["type"] == "history":
            ids.extend(m["id"] for m in frame["messages"])
    return ids


@pytest.mark.parametrize("catchup", ["join", "hello", "resume"])
async def test_a_catchup_that_reads_a_commit_before_its_fan_out_shows_it_once(
    db: Path, catchup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database can show a commit before the fan-out has delivered it: SQLite's
    writer thread commits, then the event loop hears of it. Here that window is made
    wide by handing every committed batch to the server 0.3 s late. A catch-up that reads
    the message in that window must keep holding live frames until the fan-out has
    passed it; released earlier, the message would come twice."""
    async with server(db, **NO_LIMITS) as chat, peer(chat, "talker", rooms=["busy"]) as talker:
        first = (await talker.say("before", room="busy"))["id"]
        committed = chat.committed
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(
            chat, "committed", lambda results: loop.call_later(0.3, committed, results)
        )
        await talker.send({"type": "send", "cid": "late", "room": "busy", "body": "late"})
        await asyncio.sleep(0.1)  # in the database, not yet delivered
        rooms = ["busy"] if catchup != "join" else None
        resume = 0 if catchup == "resume" else None
        async with peer(chat, "joiner", rooms=rooms, resume=resume) as joiner:
            frames = list(joiner.catchup) if catchup != "join" else []
            if catchup == "join":
                await joiner.send({"type": "join", "room": "busy"})
                await joiner.expect("joined", room="busy")
            frames += await joiner.quiet(1.0)
        acks = [f for f in await talker.quiet(0.5) if f["type"] == "ack"]
    late = acks[-1]["id"]
    assert _message_ids(frames) == [first, late]


async def test_bad_input_gets_errors_and_others_are_unaffected(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice, peer(chat, "bob") as bob:
        await alice.expect("presence")
        bad = [
            ("{oops", "bad_json"),
            ('{"type":"launch"}', "bad_frame"),
            (
                '{"type":"send","cid":"1","room":"lobby","body":"' + "x" * 4001 + '"}',
                "body_invalid",
            ),
            ('{"type":"join","room":"no spaces"}', "room_invalid"),
            ('{"type":"hello","nick":"again"}', "already_hello"),
            ('{"type":"send","cid":"1","room":"lobby","body":["x"]}', "bad_frame"),
        ]
        for text, code in bad:
            await bob.ws.send(text)
            await bob.expect("error", code=code)
        await bob.ws.send(b"\x00\x01binary")
        await bob.expect("error", code="binary_frame")
        await alice.say("alice is fine")
        msg = await bob.expect("msg")
        assert msg["body"] == "alice is fine"
        await bob.say("and bob can still talk")
    assert await db_rows(db, "SELECT body FROM messages ORDER BY id") == [
        ("alice is fine",),
        ("and bob can still talk",),
    ]


async def test_hello_must_come_first(db: Path) -> None:
    async with server(db, hello_timeout=0.5) as chat, peer(chat) as p:
        await p.send({"type": "rooms", "ref": "r"})
        await p.expect("error", code="hello_first", ref="r")
        assert await p.closed() == 1008


async def test_oversized_frame_is_closed_with_1009(db: Path) -> None:
    async with server(db) as chat, peer(chat, "big") as big, peer(chat, "small") as small:
        await big.ws.send("x" * (64 * 1024 + 1))
        assert await big.closed() == 1009
        await small.say("unaffected")


async def test_flood_is_limited_then_disconnected(db: Path) -> None:
    async with server(db, rate=5.0, burst=5, flood_strikes=10) as chat:
        async with peer(chat, "flood") as flood, peer(chat, "calm") as calm:
            # The burst (hello took one token), then nine over the rate: one short of a kick.
            for n in range(13):
                await flood.send({"type": "send", "cid": f"f{n}", "room": "lobby", "body": "x"})
            frames = [f for f in await flood.quiet(0.5) if f["type"] in ("ack", "error")]
            # In request order: four acks, then nine refusals naming their cids.
            assert [f["cid"] for f in frames] == [f"f{n}" for n in range(13)]
            assert [f["type"] for f in frames] == ["ack"] * 4 + ["error"] * 9
            assert all(f["code"] == "rate_limited" for f in frames[4:])
            assert all(0 < f["retry_after"] <= 0.2 for f in frames[4:])
            for n in range(13, 40):
                try:
                    await flood.send({"type": "send", "cid": f"f{n}", "room": "lobby", "body": "x"})
                except ConnectionClosed:
                    break
            assert await flood.closed() == 1008
            await calm.say("calm still works")
    stored = (await db_rows(db, "SELECT COUNT(*) FROM messages WHERE sender_key = 'flood'"))[0][0]
    assert isinstance(stored, int) and stored <= 8


async def test_a_flood_in_one_burst_is_answered_frame_by_frame_before_the_close(db: Path) -> None:
    """Frames pipelined past the last strike at once: every frame read before the close
    gets its answer in order (the accepted sends their acks, and they are stored), then
    1008; nothing read after the last strike is executed."""
    async with server(db, rate=5.0, burst=5, flood_strikes=10) as chat:
        async with peer(chat, "flood") as flood:
            # Hello took one token: four accepted, ten over the rate (the tenth is the last
            # strike), and six more behind them in the same burst.
            for n in range(20):
                try:
                    await flood.send({"type": "send", "cid": f"f{n}", "room": "lobby", "body": "x"})
                except ConnectionClosed:
                    break
            frames = []
            try:
                while True:
                    frames.append(await flood.recv(5.0))
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1008
            frames = [f for f in frames if f["type"] in ("ack", "error")]
            assert [f.get("cid") for f in frames] == [f"f{n}" for n in range(14)]
            assert [f["type"] for f in frames] == ["ack"] * 4 + ["error"] * 10
            assert all(f["code"] == "rate_limited" for f in frames[4:])
    rows = await db_rows(db, "SELECT cid FROM messages WHERE sender_key = 'flood' ORDER BY id")
    assert [row[0] for row in rows] == ["f0", "f1", "f2", "f3"]


async def test_slow_reader_is_dropped_and_others_keep_up(db: Path) -> None:
    async with server(db, **{**NO_LIMITS, "send_buffer_limit": 256 * 1024}) as chat:
        # A tiny receive buffer so the kernel cannot absorb what the stuck reader ignores.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", chat.port))
        # Readers that read get the headroom of an ordinary socket, so that a moment's
        # scheduling delay in this test process is not mistaken for a stuck reader.
        roomy = []
        for _ in range(2):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            reader.connect(("127.0.0.1", chat.port))
            roomy.append(reader)
        async with (
            connect(url(chat), sock=sock) as ws,
            connect(url(chat), sock=roomy[0], max_size=None) as fast_ws,
            connect(url(chat), sock=roomy[1], max_size=None) as w_ws,
        ):
            fast, w = Peer(fast_ws), Peer(w_ws)
            for p, nick in ((fast, "fast"), (w, "w")):
                await p.send({"type": "hello", "nick": nick})
                await p.until("synced")
            stuck = Peer(ws)
            await stuck.send({"type": "hello", "nick": "stuck"})
            await stuck.until("synced")
            assert ws.transport is not None
            ws.transport.pause_reading()  # never read again
            body = "y" * 3500
            count = 2500
            drain = asyncio.create_task(fast.quiet(2.0))  # fast reads its echoes and acks
            for n in range(count):
                await fast.send({"type": "send", "cid": f"c{n}", "room": "lobby", "body": body})
            got = 0
            while got < count:
                frame = await w.recv()
                got += frame["type"] == "msg"
            assert "stuck" not in chat.hub.online
            assert chat.hub.members("lobby") == ["fast", "w"]
            assert len([f for f in await drain if f["type"] == "ack"]) == count
    assert await db_rows(db, "SELECT COUNT(*) FROM messages") == [(count,)]


async def test_healthz_follows_database_writability(tmp_path: Path) -> None:
    """SQLite: another process holds the write lock. (PostgreSQL stopped and started:
    tests/test_cluster.py::test_postgres_restart_unavailable_then_recovers.)"""
    db = tmp_path / "chat.db"
    async with server(db) as chat:
        health = f"http://127.0.0.1:{chat.port}/healthz"

        def get() -> int:
            try:
                with urllib.request.urlopen(health, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert await asyncio.to_thread(get) == 200
        await asyncio.sleep(1.1)  # past the one-second cache
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        try:
            assert await asyncio.to_thread(get) == 503
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await asyncio.sleep(2.5)  # the stuck probe finishes within busy_timeout
        assert await asyncio.to_thread(get) == 200


async def test_healthz_is_not_answered_from_its_cache_after_a_write_failed(db: Path) -> None:
    async with server(db) as chat, peer(chat, "alice") as alice:
        health = f"http://127.0.0.1:{chat.port}/healthz"

        def get() -> int:
            try:
                with urllib.request.urlopen(health, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert await asyncio.to_thread(get) == 200  # and cached for a second
        # The database refusing every write, as on a volume remounted read-only.
        async with writes_refused(db, chat.store):
            await alice.send({"type": "send", "cid": "refused", "room": "lobby", "body": "x"})
            error = await alice.expect("error", code="unavailable")
            assert "readonly" in error["message"]
            assert await asyncio.to_thread(get) == 503  # within the second: not the cached 200
        await alice.say("stored again")
        assert await asyncio.to_thread(get) == 200  # not the cached 503 either


async def test_unknown_path_is_still_a_websocket_endpoint(db: Path) -> None:
    async with server(db) as chat, connect(url(chat) + "/anything") as ws:
        await ws.send(json.dumps({"type": "hello", "nick": "x" + uuid.uuid4().hex[:6]}))
        assert json.loads(await ws.recv())["type"] == "welcome"
