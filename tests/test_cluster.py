"""Several server processes on one real PostgreSQL: the promises of one server, cluster-wide.

Each replica is a real ``chat-server`` process with ``--db postgresql://...``; the
database runs in a container (``tests/pg.py``). Selected with ``-m e2e``.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat_server.backends.postgres import PostgresStore
from chat_server.cluster import Cluster
from chat_server.shared_limits import SharedQuotas
from tests.helpers import Peer, peer, server
from tests.pg import Postgres, fresh_database, query
from tests.procs import ServerProcess
from tests.test_metrics import scrape

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

Replicas = Callable[..., list[ServerProcess]]
#: Seconds of silence before a replica counts as dead, in these tests.
REPLICA_TIMEOUT = 2


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    """Start N replicas on a database: ``replicas(url, 3, "--resume-cap", "6")``."""
    started: list[ServerProcess] = []

    def start(url: str, count: int, *args: str) -> list[ServerProcess]:
        flags = ("--rate", "1000", "--burst", "1000", "--replica-timeout", str(REPLICA_TIMEOUT))
        new = [ServerProcess(url, *flags, *args).start() for _ in range(count)]
        started.extend(new)
        return new

    yield start
    for proc in started:
        proc.stop()


def healthz(proc: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/healthz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def until_healthz(proc: ServerProcess, status: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await asyncio.to_thread(healthz, proc)) != status:
        assert time.monotonic() < deadline, f"/healthz stayed {seen}, expected {status}"
        await asyncio.sleep(0.2)


async def messages(p: Peer, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """The next ``count`` msg frames (other frames skipped)."""
    got = []
    while len(got) < count:
        frame = await p.recv(timeout)
        if frame["type"] == "msg":
            got.append(frame)
    return got


async def test_every_client_on_every_replica_sees_one_order(
    pg_url: str, replicas: Replicas
) -> None:
    procs = replicas(pg_url, 3)
    async with (
        peer(procs[0].url, "a") as a,
        peer(procs[1].url, "b") as b,
        peer(procs[2].url, "c") as c,
        peer(procs[1].url, "watcher") as w,
    ):
        everyone = {"a": a, "b": b, "c": c, "w": w}
        for p in everyone.values():
            await p.quiet(0.3)

        async def burst(p: Peer, name: str) -> list[int]:
            for n in range(40):
                await p.send({"type": "send", "cid": f"{name}{n}", "room": "lobby", "body": f"{n}"})
            return []

        await asyncio.gather(burst(a, "a"), burst(b, "b"), burst(c, "c"))
        seen = {name: [m["id"] for m in await messages(p, 120)] for name, p in everyone.items()}
        assert seen["a"] == seen["b"] == seen["c"] == seen["w"]
        assert seen["w"] == sorted(set(seen["w"]))
        await w.send({"type": "history", "room": "lobby", "limit": 200, "ref": "h"})
        history = await w.expect("history", ref="h")
        assert [m["id"] for m in history["messages"]] == seen["w"]
    stored = await query(pg_url, "SELECT id FROM messages ORDER BY id")
    assert [r["id"] for r in stored] == seen["w"]


async def test_cid_resent_to_another_replica_after_kill_9_gets_the_original(
    pg_url: str, replicas: Replicas
) -> None:
    a, b = replicas(pg_url, 2)
    acked: dict[str, tuple[int, int]] = {}
    async with peer(b.url, "bob") as bob:
        await bob.quiet(0.3)
        async with peer(a.url, "alice") as alice:
            secret = alice.welcome["secret"]
            cids = [f"m{n}" for n in range(60)]
            for cid in cids:
                await alice.send({"type": "send", "cid": cid, "room": "lobby", "body": cid})
            while len(acked) < 20:  # some acknowledged, some perhaps still in flight
                frame = await alice.recv()
                if frame["type"] == "ack":
                    acked[frame["cid"]] = (frame["id"], frame["ts"])
            a.kill()  # SIGKILL: no goodbye to anybody
        # The client fails over to the other replica and resends everything unacknowledged
        # — and, to be sure, everything acknowledged too.
        async with peer(b.url, "alice", secret=secret) as alice:
            for cid in cids:
                await alice.send({"type": "send", "cid": cid, "room": "lobby", "body": cid})
            again: dict[str, tuple[int, int]] = {}
            while len(again) < len(cids):
                frame = await alice.recv()
                assert frame["type"] != "error", frame
                if frame["type"] == "ack":
                    again[frame["cid"]] = (frame["id"], frame["ts"])
        for cid, original in acked.items():
            assert again[cid] == original
        bob_saw = [m["cid"] for m in await bob.quiet(1.0) if m["type"] == "msg"]
    assert sorted(bob_saw) == sorted(set(bob_saw)), "a resend was delivered twice"
    assert set(bob_saw) == set(cids)
    rows = await query(pg_url, "SELECT cid, id, ts FROM messages")
    assert sorted(r["cid"] for r in rows) == sorted(cids)
    assert {r["cid"]: (r["id"], r["ts"]) for r in rows} == again


async def test_resume_on_another_replica_gets_exactly_what_was_missed(
    pg_url: str, replicas: Replicas
) -> None:
    a, b, c = replicas(pg_url, 3, "--resume-cap", "6")
    async with peer(a.url, "alice") as alice:
        secret = alice.welcome["secret"]
        last = (await alice.say("seen"))["id"]
    async with peer(b.url, "bob") as bob, peer(c.url, "carol") as carol:
        missed = [(await bob.say(f"b{n}"))["id"] for n in range(2)]
        missed += [(await carol.say(f"c{n}"))["id"] for n in range(2)]
        missed.append((await bob.say("to alice", to="alice"))["id"])
    async with peer(c.url, "alice", secret=secret, resume=last) as alice:
        replayed = [f["id"] for f in alice.catchup if f["type"] == "msg"]
        assert not [f for f in alice.catchup if f["type"] == "gap"]
        assert replayed == missed
        last = replayed[-1]
    async with peer(b.url, "bob", secret=bob.welcome["secret"]) as bob:
        more = [(await bob.say(f"x{n}"))["id"] for n in range(9)]
    async with peer(a.url, "alice", secret=secret, resume=last) as alice:
        gaps = [f for f in alice.catchup if f["type"] == "gap"]
        replayed = [f["id"] for f in alice.catchup if f["type"] == "msg"]
        assert replayed == more[-6:]
        assert gaps == [{"type": "gap", "after": last, "before": more[-6]}]


async def test_takeover_on_another_replica_closes_the_old_session_with_4001(
    pg_url: str, replicas: Replicas
) -> None:
    a, b, c = replicas(pg_url, 3)
    async with peer(c.url, "carol") as carol, peer(a.url, "alice") as old:
        await carol.quiet(0.5)
        async with peer(b.url, "alice", secret=old.welcome["secret"]) as new:
            with pytest.raises(ConnectionClosed) as closed:
                await old.quiet(5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            assert closed.value.rcvd.reason == "replaced: this nick connected again from 127.0.0.1"
            # alice never left the lobby: carol sees no presence change at all.
            assert [f for f in await carol.quiet(1.0) if f["type"] == "presence"] == []
            await carol.send({"type": "who", "ref": "w"})
            assert (await carol.expect("members", ref="w"))["nicks"] == ["alice", "carol"]
            await new.say("still me")
            assert [m["body"] for m in await messages(carol, 1)] == ["still me"]
    online = await query(pg_url, "SELECT nick FROM online ORDER BY nick")
    assert online == []  # everybody disconnected: nobody is left online


async def test_two_hellos_for_one_nick_on_two_replicas_leave_one_session(
    pg_url: str, replicas: Replicas
) -> None:
    a, b = replicas(pg_url, 2)
    async with peer(a.url, "dana") as first:
        secret = first.welcome["secret"]
    for _ in range(5):
        async with peer(a.url) as one, peer(b.url) as two:
            hello = {"type": "hello", "nick": "dana", "secret": secret}
            await asyncio.gather(one.send(hello), two.send(hello))
            codes = []
            for p in (one, two):
                try:
                    await p.quiet(2.0)
                    codes.append(None)
                except ConnectionClosed as closed:
                    codes.append(closed.rcvd.code if closed.rcvd else None)
            assert sorted(codes, key=str) == [4001, None], codes
            rows = await query(pg_url, "SELECT session FROM online WHERE nick_key = 'dana'")
            assert len(rows) == 1


async def test_a_killed_replicas_sessions_leave_everywhere(pg_url: str, replicas: Replicas) -> None:
    a, b = replicas(pg_url, 2)
    async with peer(b.url, "bob") as bob:
        async with peer(a.url, "carol"):
            await bob.expect("presence", event="join", nick="carol")
            a.kill()
            started = time.monotonic()
            leave = await bob.expect("presence", timeout=REPLICA_TIMEOUT + 10, event="leave")
            assert leave["nick"] == "carol"
            # Within the timeout, plus a heartbeat or two.
            assert time.monotonic() - started < REPLICA_TIMEOUT + 6
        await bob.send({"type": "who", "ref": "w"})
        assert (await bob.expect("members", ref="w"))["nicks"] == ["bob"]
    assert await query(pg_url, "SELECT * FROM online WHERE nick = 'carol'") == []


async def test_postgres_restart_unavailable_then_recovers(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    url = await fresh_database(private_postgres)
    a, b = replicas(url, 2)
    async with peer(a.url, "alice") as alice, peer(b.url, "bob") as bob:
        await alice.say("before")
        await asyncio.to_thread(private_postgres.stop)
        cid = uuid.uuid4().hex
        await alice.send({"type": "send", "cid": cid, "room": "lobby", "body": "during"})
        error = await alice.expect("error", timeout=20)
        assert error["code"] == "unavailable" and error["cid"] == cid
        await until_healthz(a, 503)
        await until_healthz(b, 503)
        await asyncio.to_thread(private_postgres.start)
        await until_healthz(a, 200, timeout=60)
        await until_healthz(b, 200, timeout=60)
        await bob.quiet(0.5)
        ack = await alice.say("during", cid=cid)  # the client's resend
        got = await messages(bob, 1)
        assert [(m["id"], m["body"]) for m in got] == [(ack["id"], "during")]
        back = await bob.say("after")
        # alice's own resent message may come after its ack: then it comes first here.
        seen = [m["id"] for m in await messages(alice, 1)]
        if seen == [ack["id"]]:
            seen = [m["id"] for m in await messages(alice, 1)]
        assert seen == [back["id"]]


async def test_postgres_restart_under_sends_answers_unavailable_never_internal(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    """The restart itself (``docker restart``), under sends from several clients: every
    send is acked or answered ``unavailable``, never ``internal``; resent until acked,
    each is stored exactly once, and nothing acked is missing. Whether a pooled
    connection is caught between the FATAL and the close is a matter of timing here
    (an outside test saw it in one restart of two);
    ``test_sessions_postgresql_ended_are_answered_unavailable_never_internal`` makes it
    certain."""
    url = await fresh_database(private_postgres)
    (a,) = replicas(url, 1, "--address-rate", "100000", "--address-burst", "100000")
    acked: dict[str, int] = {}
    codes: list[str] = []
    stop = time.monotonic() + 8

    async def sender(name: str) -> None:
        async with peer(a.url, name) as p:
            n = 0
            while time.monotonic() < stop:
                cid = f"{name}-{n}"
                n += 1
                async with asyncio.timeout(40):
                    while cid not in acked:
                        await p.send({"type": "send", "cid": cid, "room": "lobby", "body": cid})
                        frame = await p.recv(30)
                        while frame["type"] not in ("ack", "error") or frame.get("cid") != cid:
                            frame = await p.recv(30)
                        if frame["type"] == "ack":
                            acked[cid] = int(frame["id"])
                        else:
                            codes.append(f"{frame['code']}: {frame['message']}")
                            await asyncio.sleep(0.2)

    senders = asyncio.gather(*(sender(f"s{k}") for k in range(4)))
    await asyncio.sleep(1.5)
    await asyncio.to_thread(private_postgres.restart)
    await senders
    assert {code.split(":")[0] for code in codes} <= {"unavailable"}, codes
    rows = await query(url, "SELECT cid, id FROM messages")
    assert sorted((str(r[0]), int(r[1])) for r in rows) == sorted(acked.items())
    assert not _failures(a), "".join(a.log[-40:])


async def test_sigterm_with_postgres_paused_exits_0_within_3s(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    """A replica cut off from PostgreSQL (nothing answers, nothing is refused) still stops
    well inside Docker's 10 s grace: its goodbye to the cluster and the writer's queue
    are given up after a deadline."""
    url = await fresh_database(private_postgres)
    (a,) = replicas(url, 1)
    async with peer(a.url, "alice") as alice:
        await alice.say("before")
        await asyncio.to_thread(private_postgres.pause)
        try:
            # A send the writer holds, waiting for PostgreSQL, when the signal comes.
            await alice.send({"type": "send", "cid": "held", "room": "lobby", "body": "x"})
            await asyncio.sleep(0.5)
            started = time.monotonic()
            try:
                code = await asyncio.to_thread(a.terminate, 15)
            except subprocess.TimeoutExpired:
                pytest.fail("the replica ignored SIGTERM for 15 s:\n" + "".join(a.log[-20:]))
            elapsed = time.monotonic() - started
        finally:
            await asyncio.to_thread(private_postgres.unpause)
    assert code == 0, "".join(a.log[-20:])
    assert elapsed < 3, f"took {elapsed:.1f} s:\n" + "".join(a.log[-20:])


async def test_healthz_answers_503_on_time_while_postgres_is_paused(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    """A paused PostgreSQL answers nothing and refuses nothing: /healthz still says 503
    within its probe's timeout, every time (a monitor must not see a hang and a dropped
    connection)."""
    url = await fresh_database(private_postgres)
    (a,) = replicas(url, 1)
    await until_healthz(a, 200)
    async with peer(a.url, "alice") as alice:
        await asyncio.to_thread(private_postgres.pause)
        try:
            # Sends the writer holds, waiting for PostgreSQL, as in real traffic.
            for n in range(5):
                await alice.send({"type": "send", "cid": f"h{n}", "room": "lobby", "body": "x"})
            await asyncio.sleep(1.5)  # past the cached success
            for _ in range(4):
                started = time.monotonic()
                statuses = await asyncio.gather(
                    *(asyncio.to_thread(healthz, a) for _ in range(3)), return_exceptions=True
                )
                elapsed = time.monotonic() - started
                assert statuses == [503] * 3, f"{statuses} after {elapsed:.1f} s"
                assert elapsed < 4.5, f"503 took {elapsed:.1f} s"
        finally:
            await asyncio.to_thread(private_postgres.unpause)
    await until_healthz(a, 200)


async def test_sends_are_answered_unavailable_on_time_while_postgres_is_paused(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    """A paused PostgreSQL answers nothing and refuses nothing, and a cancelled query
    waits for it to confirm. A send is answered ``unavailable`` after the query timeout
    (10 s) and a second's grace, the sends queued behind it at once; resent by cid after
    the database is back, each is stored once."""
    url = await fresh_database(private_postgres)
    (a,) = replicas(url, 1)
    async with peer(a.url, "alice") as alice:
        await alice.say("before")
        await asyncio.to_thread(private_postgres.pause)
        try:
            started = time.monotonic()
            await alice.send({"type": "send", "cid": "held", "room": "lobby", "body": "x"})
            await asyncio.sleep(1.0)
            await alice.send({"type": "send", "cid": "queued", "room": "lobby", "body": "y"})
            held = await alice.expect("error", timeout=20, cid="held")
            held_after = time.monotonic() - started
            queued = await alice.expect("error", timeout=5, cid="queued")
            queued_after = time.monotonic() - started
        finally:
            await asyncio.to_thread(private_postgres.unpause)
        assert held["code"] == queued["code"] == "unavailable"
        assert held_after < 14, f"unavailable after {held_after:.1f} s"
        assert queued_after < 14, f"the queued send was answered after {queued_after:.1f} s"
        for cid, body in (("held", "x"), ("queued", "y")):
            async with asyncio.timeout(30):
                while True:  # the pool may need a moment to be writable again
                    await alice.send({"type": "send", "cid": cid, "room": "lobby", "body": body})
                    frame = await alice.recv()
                    while frame["type"] not in ("ack", "error"):
                        frame = await alice.recv()
                    if frame["type"] == "ack":
                        break
                    await asyncio.sleep(0.5)
    rows = await query(url, "SELECT cid, count(*) FROM messages GROUP BY cid ORDER BY cid")
    assert [(r[0], r[1]) for r in rows if r[0] in ("held", "queued")] == [
        ("held", 1),
        ("queued", 1),
    ]


async def test_every_request_is_answered_unavailable_on_time_while_postgres_is_paused(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    """Not only a write waits for a paused PostgreSQL: a session's first send reads the
    shared quotas' balances, a direct message to an offline nick reads the nick, a join
    charges the catch-up and records the room. Each read's cancellation waits for a
    server that never confirms it, once in the query and again when the connection goes
    back to the pool: the first send was answered after 40 s, after the pause. Every
    request is answered on time, sends within 11 s; and resent after, stored once."""
    url = await fresh_database(private_postgres)
    (a,) = replicas(url, 1)
    async with peer(a.url, "carol"):
        pass  # registered, then offline
    async with (
        peer(a.url, "alice") as alice,
        peer(a.url, "dave") as dave,
        peer(a.url, "bob") as bob,
        peer(a.url, "erin") as erin,
    ):
        await asyncio.to_thread(private_postgres.pause)
        try:
            started = time.monotonic()
            # The first send of each: nothing of theirs was read or charged before.
            await alice.send({"type": "send", "cid": "room", "room": "lobby", "body": "x"})
            await dave.send({"type": "send", "cid": "dm", "to": "carol", "body": "y"})
            await bob.send({"type": "join", "room": "new", "ref": "j"})
            await erin.send({"type": "history", "room": "lobby", "ref": "h"})

            async def answer(p: Peer, **fields: str) -> tuple[object, float]:
                frame = await p.expect("error", timeout=20, **fields)
                return frame["code"], round(time.monotonic() - started, 1)

            seen = await asyncio.gather(
                answer(alice, cid="room"),
                answer(dave, cid="dm"),
                answer(bob, ref="j"),
                answer(erin, ref="h"),
            )
        finally:
            await asyncio.to_thread(private_postgres.unpause)
        assert [code for code, _ in seen] == ["unavailable"] * 4, seen
        (_, room_after), (_, dm_after), (_, join_after), (_, history_after) = seen
        assert room_after <= 11.5 and dm_after <= 11.5, seen
        assert join_after <= 13 and history_after <= 13, seen
        for p, cid, target in ((alice, "room", {"room": "lobby"}), (dave, "dm", {"to": "carol"})):
            async with asyncio.timeout(30):
                while True:  # the pool may need a moment to be writable again
                    await p.send({"type": "send", "cid": cid, "body": cid, **target})
                    frame = await p.recv()
                    while frame["type"] not in ("ack", "error"):
                        frame = await p.recv()
                    if frame["type"] == "ack":
                        break
                    await asyncio.sleep(0.5)
    rows = await query(url, "SELECT cid, count(*) FROM messages GROUP BY cid ORDER BY cid")
    assert [(r[0], r[1]) for r in rows] == [("dm", 1), ("room", 1)]


async def test_a_hello_the_database_cannot_answer_is_closed_1011_not_blamed_on_the_client(
    private_postgres: Postgres, replicas: Replicas
) -> None:
    """A client that said hello in time is not told "no hello in time" (1008, policy) when
    PostgreSQL hangs: it gets 1011 (retry) naming the database."""
    url = await fresh_database(private_postgres)
    (a,) = replicas(url, 1, "--hello-timeout", "3")
    await until_healthz(a, 200)
    async with connect(a.url) as ws:
        await asyncio.to_thread(private_postgres.pause)
        try:
            await ws.send('{"type": "hello", "nick": "newcomer"}')
            async with asyncio.timeout(15):
                await ws.wait_closed()
        finally:
            await asyncio.to_thread(private_postgres.unpause)
    assert ws.close_code == 1011, (ws.close_code, ws.close_reason)
    assert "database" in (ws.close_reason or "")


async def test_catch_up_waits_for_the_stream_and_shows_a_message_once(
    pg_url: str, replicas: Replicas
) -> None:
    """A message visible to a catch-up query before its notification arrives: shown once."""
    (other,) = replicas(pg_url, 1)
    async with server(pg_url) as chat:
        cluster = chat.cluster
        assert isinstance(cluster, Cluster)
        stalled = asyncio.Event()
        deliver = cluster._on_batch

        async def slow_stream(payload: str) -> None:
            await stalled.wait()  # the notification is late on this replica
            await deliver(payload)

        cluster._on_batch = slow_stream
        async with peer(other.url, "bob") as bob:
            sent = await bob.say("committed before the join")
        joining = asyncio.create_task(_hello(chat.port, "joe"))
        await asyncio.sleep(0.5)
        assert not joining.done(), "the catch-up ended before the stream reached its snapshot"
        stalled.set()
        frames = await joining
    ids = [f["id"] for f in frames if f["type"] == "msg"]
    ids += [m["id"] for f in frames if f["type"] == "history" for m in f["messages"]]
    assert ids.count(sent["id"]) == 1, frames


async def _hello(port: int, nick: str) -> list[dict[str, object]]:
    """Hello on a replica; every frame up to ``synced`` and for a second after."""
    async with peer(f"ws://127.0.0.1:{port}") as p:
        await p.send({"type": "hello", "nick": nick})
        frames = await p.until("synced", timeout=20)
        return frames + await p.quiet(1.0)


async def test_replicas_report_the_stream_on_metrics(pg_url: str, replicas: Replicas) -> None:
    a, b = replicas(pg_url, 2)
    async with peer(a.url, "alice") as alice, peer(b.url, "bob") as bob:
        await bob.quiet(0.3)
        ack = await alice.say("measured")
        assert [m["id"] for m in await messages(bob, 1)] == [ack["id"]]
        seen = await asyncio.to_thread(scrape, b.port)
    assert seen["chat_stream_up"] == 1
    assert seen["chat_stream_position"] == ack["id"]
    assert seen["chat_fanout_lag_seconds_count"] >= 1
    assert seen["chat_deliveries_total"] == 1  # bob, on b; alice is on a
    assert seen["chat_messages_total"] == 0  # committed by a's writer, not b's


def _forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_a_nick_s_message_rate_holds_across_replicas(pg_url: str, replicas: Replicas) -> None:
    a, b = replicas(pg_url, 2, "--rate", "0.1", "--burst", "4")
    async with peer(a.url, "alice") as alice:
        for n in range(3):  # hello and 3 sends: the burst of 4, on replica a
            await alice.say(f"m{n}")
    # Sends are charged to the shared bucket once per flush interval: the documented
    # bound on an overshoot across replicas.
    await asyncio.sleep(SharedQuotas.FLUSH_EVERY * 4)
    async with peer(b.url, "alice", secret=alice.welcome["secret"]) as again:
        await again.say("one token was left")  # and about 0.1 came back since
        await again.send({"type": "send", "cid": "over", "room": "lobby", "body": "over"})
        refused = await again.expect("error", cid="over")
        assert refused["code"] == "rate_limited" and refused["retry_after"] > 1


async def test_connections_per_address_are_counted_across_replicas(
    pg_url: str, replicas: Replicas
) -> None:
    a, b = replicas(pg_url, 2, "--max-connections-per-ip", "2", "--trusted-proxies", "127.0.0.1")
    client = _forwarded("203.0.113.9")
    async with connect(a.url, additional_headers=client), connect(b.url, additional_headers=client):
        await asyncio.sleep(SharedQuotas.SYNC_EVERY * 2.5)  # the replicas exchange counts
        with pytest.raises(InvalidStatus) as refused:
            async with connect(a.url, additional_headers=client):
                pass
        assert refused.value.response.status_code == 429
        async with connect(a.url, additional_headers=_forwarded("203.0.113.10")):
            pass  # another address is not affected


async def test_nick_registrations_per_address_are_counted_across_replicas(
    pg_url: str, replicas: Replicas
) -> None:
    a, b = replicas(pg_url, 2, "--nicks-per-hour", "2", "--trusted-proxies", "127.0.0.1")
    client = _forwarded("203.0.113.9")
    for n, proc in enumerate((a, b, a)):
        async with connect(proc.url, additional_headers=client) as ws:
            p = Peer(ws)
            await p.send({"type": "hello", "nick": f"new{n}"})
            reply = await p.recv()
            if n < 2:
                assert reply["type"] == "welcome", reply
            else:
                assert reply["type"] == "error" and reply["code"] == "rate_limited", reply


async def test_an_address_sending_through_two_replicas_at_once_keeps_its_rate(
    pg_url: str, replicas: Replicas
) -> None:
    """Per replica, the address could send 5 + 5/s * 4 s = 25, 50 through both. Shared:
    25 in all, plus at most what one replica grants before its next flush learns the
    shared balance (a burst arriving within one flush interval: at most the burst, 5)."""
    a, b = replicas(
        pg_url, 2, "--address-rate", "5", "--address-burst", "5", "--trusted-proxies", "127.0.0.1"
    )
    client = _forwarded("203.0.113.9")
    acked = 0

    async def chatter(proc: ServerProcess, nick: str) -> None:
        nonlocal acked
        async with connect(proc.url, additional_headers=client) as ws:
            p = Peer(ws)
            await p.send({"type": "hello", "nick": nick})
            await p.until("synced")
            for n in range(40):  # 10 per second through each replica, for 4 s
                await p.send({"type": "send", "cid": f"c{n}", "room": "lobby", "body": "x"})
                await asyncio.sleep(0.1)
            for frame in await p.quiet(1.0):
                acked += frame["type"] == "ack"

    await asyncio.gather(chatter(a, "one"), chatter(b, "two"))
    assert 20 <= acked <= 25 + 3 + 5, acked  # 3: what refills while the last acks come


async def test_takeover_false_is_refused_when_the_nick_is_live_on_another_replica(
    pg_url: str, replicas: Replicas
) -> None:
    a, b = replicas(pg_url, 2)
    async with peer(a.url, "alice") as alice, peer(b.url) as other:
        hello = {"type": "hello", "nick": "alice", "secret": alice.welcome["secret"]}
        await other.send({**hello, "takeover": False})
        refused = await other.expect("error")
        assert refused["code"] == "nick_in_use"
        # Nothing changed: alice on a is still the one live session.
        online = await query(pg_url, "SELECT nick, replica FROM online")
        assert [r["nick"] for r in online] == ["alice"]
        await alice.say("still here")
        # And the refused client may still say hello with another nick.
        await other.send({"type": "hello", "nick": "bob"})
        assert (await other.expect("welcome"))["nick"] == "bob"


def _failures(proc: ServerProcess) -> list[str]:
    """The errors a replica logged, but for the database being unavailable (expected)."""
    return [line for line in proc.log if " ERROR " in line and "database unavailable" not in line]


class FreezableRelay:
    """A TCP relay to PostgreSQL that can go silent, as a cut network does (no FIN, no RST)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while not self.frozen.is_set() and (data := await src.read(65536)):
                if self.frozen.is_set():
                    break  # swallowed, as by a dead link
                dst.write(data)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        await asyncio.Event().wait()  # keep both sockets open: silence, not a close


async def test_sessions_postgresql_ended_are_answered_unavailable_never_internal(
    postgres: Postgres, pg_url: str, replicas: Replicas
) -> None:
    """PostgreSQL ending its sessions (a restart, an administrator) sends each an
    unsolicited FATAL, then closes it. asyncpg takes the FATAL on an idle pooled
    connection for a protocol error, and until the close reaches it the pool hands the
    connection out and every query on it fails with InternalClientError ("cannot switch
    to state 12; another operation (2) is in progress"): sends were answered
    ``internal``. On a restart that lasts a moment; through this relay, which passes
    the FATAL on and keeps the client's side open, it lasts: every pooled connection
    of the replica is in that state when the sends come. They are answered
    ``unavailable`` (nothing was stored), and resent, acked and stored once."""
    relay = FreezableRelay(postgres.port)  # never frozen: it only keeps closes from passing
    port = await relay.start()
    # Started from a thread: the relay runs on this loop.
    relayed = pg_url.replace(f":{postgres.port}/", f":{port}/")
    (proc,) = await asyncio.to_thread(replicas, relayed, 1)
    async with peer(proc.url, "alice") as alice:
        await alice.say("before", cid="before")
        ended = await query(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'chat-server%'",
        )
        assert ended, "no session of the replica to end"
        await asyncio.sleep(0.5)  # the FATALs have arrived
        codes = []
        for n in range(6):
            cid = f"after{n}"
            async with asyncio.timeout(30):
                while True:
                    await alice.send({"type": "send", "cid": cid, "room": "lobby", "body": cid})
                    frame = await alice.recv()
                    while frame["type"] not in ("ack", "error") or frame.get("cid") != cid:
                        frame = await alice.recv()
                    codes.append(frame.get("code", "ack"))
                    if frame["type"] == "ack":
                        break
                    await asyncio.sleep(0.2)
        assert "internal" not in codes, codes
        assert set(codes) <= {"ack", "unavailable"}, codes
    rows = await query(pg_url, "SELECT cid, count(*) FROM messages GROUP BY cid ORDER BY cid")
    assert [(r[0], r[1]) for r in rows] == [(f"after{n}", 1) for n in range(6)] + [("before", 1)]
    assert not _failures(proc), "".join(proc.log[-40:])


async def test_a_session_cut_off_mid_transaction_does_not_block_the_others(
    postgres: Postgres, pg_url: str, replicas: Replicas
) -> None:
    """The numbering lock held by a transaction whose client went silent is freed."""
    (proc,) = replicas(pg_url, 1)
    async with peer(proc.url, "alice") as alice:
        await alice.say("before")
        relay = FreezableRelay(postgres.port)
        port = await relay.start()
        # Another replica's store, its connection to PostgreSQL through the relay, in the
        # middle of a transaction that holds chat_append's lock when the link goes dead.
        store = await PostgresStore.open(pg_url.replace(f":{postgres.port}/", f":{port}/"))
        session = await store._pool.acquire()
        await session.execute("BEGIN")
        await session.execute("SELECT pg_advisory_xact_lock(7201100)")
        relay.frozen.set()
        started = time.monotonic()
        await alice.send({"type": "send", "cid": "after", "room": "lobby", "body": "after"})
        try:
            async with asyncio.timeout(40):
                while True:  # unavailable while the lock is held (10 s query timeout), then acked
                    frame = await alice.recv(40)
                    if frame.get("cid") != "after" or frame["type"] == "msg":
                        continue
                    if frame["type"] == "ack":
                        break
                    assert frame["code"] == "unavailable", frame
                    resend = {"type": "send", "cid": "after", "room": "lobby", "body": "after"}
                    await alice.send(resend)
        except TimeoutError:
            pytest.fail("writes stayed blocked by the silent session's lock for 40 s")
        assert time.monotonic() - started < 25
        store._pool.terminate()
