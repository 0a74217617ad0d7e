"""A generator process: it holds some of the clients and runs its share of each workload.

The parent (:class:`bench.generator.Generator`) starts several of these, pinned away from
the server's core, and drives them with small commands over a pipe; each answers with
plain figures (counts, latency histograms) that the parent adds up. A command is a dict
with an ``id``, an ``op`` and its arguments; ``op_<name>`` runs it, as a task of its own,
so that one process can, say, keep talking while its other clients reconnect.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from bench.wire import MARK, Client, Stats, open_client

#: Latency histogram bucket, ns (10 µs).
BUCKET_NS = 10_000


def histogram(latencies: Iterable[int]) -> dict[int, int]:
    return dict(Counter(lat // BUCKET_NS for lat in latencies))


def body(sender: int, seq: int, size: int) -> str:
    head = f"b|{sender}|{seq}|{time.monotonic_ns()}|"
    return head + "x" * max(0, size - len(head))


def chat_send(room: str, sender: int, seq: int, size: int) -> str:
    # Bodies are ASCII without quotes or backslashes: no JSON escaping is needed.
    text = body(sender, seq, size)
    return f'{{"type":"send","cid":"c{seq}","room":"{room}","body":"{text}"}}'


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.stats = Stats()
        self.clients: dict[int, Client] = {}  # global client id -> client
        self.sent: dict[int, int] = {}  # global sender id -> messages sent so far
        self.talking = False

    # --- opening -----------------------------------------------------------------------

    async def op_open(
        self,
        url: str,
        kind: str,
        ids: list[int],
        rooms: list[str],
        tag: str,
        senders: int,
        sources: list[str] | None = None,
        concurrency: int = 200,
        secrets: dict[str, str] | None = None,
        resume: dict[str, int] | None = None,
        keep_frames: bool = False,
        last_seq: dict[int, int] | None = None,
        start_at: float = 0.0,
        report: bool = False,
        retries: int = 0,
        gate_hello: bool = False,
    ) -> dict[str, Any]:
        """Connect clients ``ids`` (and, for chat, say hello and wait for ``synced``).

        Client ``i`` joins ``rooms[i % len(rooms)]`` as nick ``{tag}{i}``, with its secret
        from ``secrets`` if there is one, resuming after ``resume[nick]`` if given, else
        with no history. ``concurrency`` bounds handshakes in flight (0: all at once,
        at the monotonic time ``start_at``). With ``keep_frames`` a client stays in frame
        mode after ``synced`` (it keeps track of message ids). Returns new secrets and,
        with ``report``, per nick: the highest id seen, when ``synced`` came, and how many
        ``msg`` frames the catch-up carried. A connection that fails before its
        handshake is done is tried again up to ``retries`` times (counted in ``retried``).
        With ``gate_hello``, ``concurrency`` bounds clients from handshake to ``synced``.
        """
        bound = asyncio.Semaphore(concurrency) if concurrency else None
        gate, hello_gate = (None, bound) if gate_hello else (bound, None)
        known = secrets or {}
        new_secrets: dict[str, str] = {}
        per_nick: dict[str, tuple[int, float, int]] = {}
        loop = asyncio.get_running_loop()
        if start_at:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))

        failures: list[str] = []

        async def connect(i: int) -> Client:
            source = sources[i % len(sources)] if sources else None
            on_frame = _hello_frame if kind == "chat" else None
            for attempt in range(retries + 1):
                try:
                    return await open_client(
                        url, self.stats, senders=senders, on_frame=on_frame, source=source
                    )
                except (OSError, TimeoutError) as exc:
                    if attempt == retries:
                        raise
                    failures.append(repr(exc))
                    await asyncio.sleep(0.5)
            raise AssertionError("unreachable")

        async def one(i: int) -> None:
            if gate is not None:
                async with gate:
                    client = await connect(i)
            else:
                client = await connect(i)
            self.clients[i] = client
            if resume is None:
                # A new client: its numbering (and so its client message ids) starts again.
                # One that resumes goes on: the server would take a reused id as a retry.
                self.sent[i] = 0
            for sender, seq in (last_seq or {}).items():
                client.last[sender] = seq
            if kind != "chat":
                return
            nick = f"{tag}{i}"
            room = rooms[i % len(rooms)]
            hello: dict[str, Any] = {"type": "hello", "nick": nick, "rooms": [room]}
            if nick in known:
                hello["secret"] = known[nick]
            if resume is not None and nick in resume:
                hello["resume"] = resume[nick]
            else:
                hello["history"] = 0
            synced: asyncio.Future[None] = loop.create_future()
            client.waiter = synced
            client.data.update(nick=nick, room=room, synced=synced, high=0, replayed=0)
            client.send(json.dumps(hello))
            try:
                await synced
            except BaseException:
                del self.clients[i]  # refused: it is counted as an error, not as a receiver
                client.abort()
                raise
            if client.data.get("secret"):
                new_secrets[nick] = client.data["secret"]
            if report:
                data = client.data
                per_nick[nick] = (data["high"], data["synced_at"], data["replayed"])
            if not keep_frames:
                client.on_frame = None  # from now on: marks only, the cheap path

        async def gated(i: int) -> None:
            if hello_gate is None:
                return await one(i)
            async with hello_gate:
                return await one(i)

        outcomes = await asyncio.gather(*(gated(i) for i in ids), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        return {
            "opened": len(ids) - len(errors),
            "error_count": len(errors),
            "errors": [repr(e) for e in errors[:3]],
            "secrets": new_secrets,
            "per_nick": per_nick,
            "retried": len(failures),
            "retry_reasons": sorted(set(failures))[:3],
        }

    # --- fan-out -----------------------------------------------------------------------

    async def op_send(
        self,
        kind: str,
        senders: list[int],
        room: str,
        rate: float,
        start_at: float,
        seconds: float,
        size: int = 200,
    ) -> dict[str, Any]:
        """Send ``rate`` msg/s in all, round-robin over ``senders``, for ``seconds``."""
        self.stats.reset()
        before = {s: self.sent.setdefault(s, 0) for s in senders}
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()
        total = 0
        count = len(senders)
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) - total
            for _ in range(due):
                sender = senders[total % count]
                seq = self.sent[sender]
                self.sent[sender] = seq + 1
                total += 1
                if kind == "chat":
                    self.clients[sender].send(chat_send(room, sender, seq, size))
                else:
                    self.clients[sender].send(body(sender, seq, size))
            await asyncio.sleep(0.005)
        return {"sent": {s: (before[s], self.sent[s]) for s in senders}, "total": total}

    async def op_drain(self, expected: dict[int, tuple[int, int]], wait: float = 10.0) -> int:
        """Wait until the receivers here have received as many marks as every one of them
        gets from the messages numbered ``expected[sender]`` = [first, end) (sent in the
        last ``op_send``), or ``wait`` seconds; return how many arrived. What they were is
        for ``op_tally``: the caller stops its CPU window in between."""
        want = sum(end - first for first, end in expected.values()) * len(self.clients)
        deadline = time.monotonic() + wait
        # Polling, not an Event: the receive path stays free of any per-frame signalling.
        while self.stats.received < want and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self.stats.received

    async def op_tally(self, expected: dict[int, tuple[int, int]]) -> dict[str, Any]:
        """Account for the marks received since the last ``op_send`` (``Stats.tally``):
        latencies, and per receiver and sender what is missing, doubled or out of order."""
        stats = self.stats
        stats.tally()
        unique = self._unique(expected)
        want = sum(end - first for first, end in expected.values()) * len(self.clients)
        return {
            "receivers": len(self.clients),
            "received": stats.received,
            "unique": unique,
            "missing": want - unique,
            "duplicated": stats.duplicated,
            "gaps": stats.gaps,
            "histogram": histogram(stats.latencies),
        }

    def _unique(self, expected: dict[int, tuple[int, int]]) -> int:
        total = 0
        for client in self.clients.values():
            last = client.last
            for sender, (first, end) in expected.items():
                total += max(0, min(last[sender] + 1, end) - first)
        return total

    # --- persistence -------------------------------------------------------------------

    async def op_persist(
        self, senders: list[int], rooms: list[str], window: int, seconds: float, size: int = 200
    ) -> dict[str, Any]:
        """Closed loop: each sender keeps ``window`` messages waiting for their ack."""
        acked = dict.fromkeys(senders, 0)
        inflight = dict.fromkeys(senders, 0)
        stopping = False

        def send_one(i: int) -> None:
            seq = self.sent.get(i, 0)
            self.sent[i] = seq + 1
            inflight[i] += 1
            self.clients[i].send(chat_send(rooms[i % len(rooms)], i, seq, size))

        def on_frame(client: Client, payload: bytes) -> None:
            if payload.startswith(b'{"type":"ack"'):
                i = client.data["id"]
                acked[i] += 1
                inflight[i] -= 1
                if not stopping:
                    send_one(i)

        for i in senders:
            self.clients[i].data["id"] = i
            self.clients[i].on_frame = on_frame
        for i in senders:
            for _ in range(window):
                send_one(i)
        started = time.monotonic()
        await asyncio.sleep(seconds)
        in_window = sum(acked.values())
        wall = time.monotonic() - started
        stopping = True
        deadline = time.monotonic() + 15
        while any(inflight.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for i in senders:
            self.clients[i].on_frame = None
        return {
            "acked_in_window": in_window,
            "wall": wall,
            "acked_total": sum(acked.values()),
            "unacked": sum(inflight.values()),
        }

    # --- reconnect storm -----------------------------------------------------------------

    async def op_talk(
        self, talkers: dict[int, str], count: int = 0, rate: float = 0.0, size: int = 200
    ) -> dict[str, Any]:
        """Talkers (client id -> room) send ``count`` messages each, or ``rate`` msg/s each
        until ``op_stop_talk``; then wait for every ack."""
        acked = dict.fromkeys(talkers, 0)
        sent_now = dict.fromkeys(talkers, 0)

        def on_frame(client: Client, payload: bytes) -> None:
            if payload.startswith(b'{"type":"ack"'):
                acked[client.data["id"]] += 1

        for i in talkers:
            self.clients[i].data["id"] = i
            self.clients[i].on_frame = on_frame

        def send(i: int) -> None:
            seq = self.sent.get(i, 0)
            self.sent[i] = seq + 1
            sent_now[i] += 1
            self.clients[i].send(chat_send(talkers[i], i, seq, size))

        if count:
            for i in talkers:
                for _ in range(count):
                    send(i)
        else:
            self.talking = True
            started = time.monotonic()
            rounds = 0
            while self.talking:
                due = int((time.monotonic() - started) * rate) - rounds
                for _ in range(max(0, due)):
                    rounds += 1
                    for i in talkers:
                        send(i)
                await asyncio.sleep(0.005)
        deadline = time.monotonic() + 30
        while sum(acked.values()) < sum(sent_now.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for i in talkers:
            self.clients[i].on_frame = None
        return {
            "last_seq": {i: self.sent[i] - 1 for i in talkers},
            "sent": sum(sent_now.values()),
            "acked": sum(acked.values()),
        }

    async def op_stop_talk(self) -> None:
        self.talking = False

    async def op_highs(self) -> dict[str, int]:
        """The highest message id each client has seen (clients kept in frame mode)."""
        return {c.data["nick"]: c.data["high"] for c in self.clients.values() if "nick" in c.data}

    async def op_storm_figures(
        self, cutoff: int, expected: dict[int, int], talker_rooms: dict[int, str]
    ) -> dict[str, Any]:
        """Live latencies received until ``cutoff`` (monotonic ns), and what each client
        still misses of its room's talker (``expected``: talker -> last sequence sent)."""
        stats = self.stats
        live = [lat for lat, at in zip(stats.latencies, stats.times, strict=True) if at <= cutoff]
        missing = 0
        for client in self.clients.values():
            for talker, last in expected.items():
                if talker_rooms[talker] == client.data.get("room"):
                    missing += max(0, last - client.last[talker])
        return {
            "histogram": histogram(live),
            "live_frames": len(live),
            "duplicated": stats.duplicated,
            "gaps": stats.gaps,
            "missing": missing,
        }

    # --- housekeeping ------------------------------------------------------------------

    async def op_reset(self) -> None:
        self.stats.reset()

    async def op_close(self, ids: list[int] | None = None, wait: float = 10.0) -> int:
        """Close clients (all of them by default) and wait for their connections to end."""
        chosen = list(self.clients) if ids is None else [i for i in ids if i in self.clients]
        clients = [self.clients.pop(i) for i in chosen]
        for client in clients:
            client.close()
        if clients:
            await asyncio.wait([client.closed for client in clients], timeout=wait)
            for client in clients:
                if not client.closed.done():
                    client.abort()
        return len(clients)

    async def op_count(self) -> int:
        """Clients whose connection is still open."""
        return sum(1 for c in self.clients.values() if c.transport is not None)


def _hello_frame(client: Client, payload: bytes) -> None:
    """Frame mode: the secret, the highest id seen, the catch-up, then live latencies."""
    data = client.data
    synced = data["synced"]
    if payload.startswith(b'{"type":"msg"'):
        head = payload[:40]
        start = head.find(b'"id":') + 5
        end = head.find(b",", start)
        if start > 4 and end > start:
            data["high"] = max(data["high"], int(head[start:end]))
        match = MARK.search(payload)
        if match is None:
            return
        sender, seq = int(match.group(1)), int(match.group(2))
        client.see_seq(sender, seq)
        if not synced.done():
            data["replayed"] += 1  # caught up, not live: no latency
        else:
            now = time.monotonic_ns()
            client.stats.latencies.append(now - int(match.group(3)))
            client.stats.times.append(now)
            client.stats.received += 1
        return
    if synced.done():
        return
    if payload.startswith(b'{"type":"synced"'):
        data["synced_at"] = time.monotonic()
        synced.set_result(None)
    elif payload.startswith(b'{"type":"welcome"'):
        data["secret"] = json.loads(payload).get("secret")
    elif payload.startswith(b'{"type":"error"'):
        synced.set_exception(RuntimeError(payload.decode(errors="replace")))


def main(conn: Connection, index: int, cpus: Sequence[int]) -> None:
    """Process entry point (``multiprocessing``, spawn)."""
    from bench.targets import raise_nofile

    if cpus:
        os.sched_setaffinity(0, set(cpus))
    raise_nofile()
    worker = Worker(index)

    async def run(ident: int, op: str, args: dict[str, Any]) -> None:
        try:
            value = await getattr(worker, f"op_{op}")(**args)
        except Exception:
            conn.send({"id": ident, "error": traceback.format_exc()})
        else:
            conn.send({"id": ident, "ok": value})

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        while True:
            command: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
            ident, op = command.pop("id"), command.pop("op")
            if op == "quit":
                await worker.op_close(wait=2)
                conn.send({"id": ident, "ok": True})
                return
            task = asyncio.create_task(run(ident, op, command))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
