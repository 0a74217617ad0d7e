"""The hub's membership bookkeeping against a naive model (property-based)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_server.config import parse_config
from chat_server.connections import frame_text
from chat_server.fanout import Hold, Hub
from tests.helpers import FakeMember

NICKS = st.sampled_from(["alice", "Alice", "bob", "BOB", "carol", "dave", "Eve", "eve_"])
ROOMS = st.sampled_from(["a", "b", "c"])
STEP = st.tuples(st.sampled_from(["add", "join", "leave", "remove", "page"]), NICKS, ROOMS)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(STEP, max_size=60), after=st.none() | NICKS, limit=st.integers(1, 5))
def test_member_lists_stay_sorted_and_exact(
    steps: list[tuple[str, str, str]], after: str | None, limit: int
) -> None:
    hub = Hub(buffer_limit=1 << 20)
    live: dict[str, FakeMember] = {}  # the model: who is online, under which key
    for action, nick, room in steps:
        member = live.get(nick.lower())
        if action == "add" and member is None:
            member = FakeMember(nick)
            hub.add(member)
            live[member.nick_key] = member
        elif member is None:
            continue
        elif action == "join":
            hub.join(member, room)
        elif action == "leave":
            hub.leave(member, room)
        elif action == "remove":
            hub.remove(member)
            del live[member.nick_key]
        for name in (None, "a", "b", "c"):
            pool = live.values() if name is None else [m for m in live.values() if name in m.rooms]
            expected = sorted((m.nick for m in pool), key=str.lower)
            assert hub.members(name) == expected
            if name is not None:
                assert hub.count(name) == len(expected)
            rest = [n for n in expected if after is None or n.lower() > after.lower()]
            assert hub.member_page(name, after, limit) == (rest[:limit], len(rest) > limit)


@dataclass
class FakeRemote:
    """The other replicas of a cluster: nicks per room (None: everyone online there)."""

    rooms: dict[str | None, list[str]]

    def nicks(self, room: str | None) -> list[str]:
        return list(self.rooms.get(room, []))

    def count(self, room: str) -> int:
        return len(self.rooms.get(room, []))

    def is_online(self, key: str) -> bool:
        return any(nick.lower() == key for nick in self.rooms.get(None, []))


def test_a_cluster_page_of_members_merges_this_replica_and_the_others() -> None:
    hub = Hub(buffer_limit=1 << 20)
    for nick in ("bob", "Dave", "frank"):
        member = FakeMember(nick)
        hub.add(member)
        hub.join(member, "a")
    hub.remote = FakeRemote({None: ["alice", "Carol", "eve", "bob"], "a": ["alice", "eve"]})
    assert hub.members(None) == ["alice", "bob", "Carol", "Dave", "eve", "frank"]
    assert hub.members("a") == ["alice", "bob", "Dave", "eve", "frank"]
    assert hub.member_page("a", None, 2) == (["alice", "bob"], True)
    assert hub.member_page("a", "bob", 2) == (["Dave", "eve"], True)
    assert hub.member_page("a", "eve", 2) == (["frank"], False)
    assert hub.count("a") == 5 and hub.is_online("carol") and not hub.is_online("zed")
    assert hub.members("b") == []


@dataclass(eq=False)
class RecordingLink:
    """A link that keeps its socket writes. Like a connection, it sends what was deferred
    before anything written later. A ``stuck`` one is never read: what it writes stays
    unsent."""

    writes: list[list[bytes]] = field(default_factory=list)
    deferred: list[bytes] = field(default_factory=list)
    unsent: int = 0
    stuck: bool = False

    def write_framed(self, frames: list[bytes]) -> None:
        self.writes.append([*self.deferred, *frames])
        self.deferred = []
        if self.stuck:
            self.unsent += sum(map(len, self.writes[-1]))

    def defer_framed(self, frames: list[bytes]) -> None:
        self.deferred += frames

    def flush(self) -> None:
        if self.deferred:
            self.write_framed([])

    def buffered(self) -> int:
        return self.unsent + sum(map(len, self.deferred))


def test_a_batch_is_framed_once_and_written_once_per_recipient_in_order() -> None:
    hub = Hub(buffer_limit=1000)
    alice, bob, slow = (FakeMember(n, link=RecordingLink()) for n in ("alice", "bob", "slow"))
    holding = FakeMember("carol", link=RecordingLink(), hold=Hold())
    slow.link.unsent = 1001
    everyone = [alice, bob, holding, slow]
    hub.publish_many(
        [(everyone, b'"one"', None), ([alice], b'"ack"', None), (everyone, b'"two"', None)]
    )
    one, ack, two = (frame_text(data) for data in (b'"one"', b'"ack"', b'"two"'))
    assert alice.link.writes == [[one, ack, two]]
    assert bob.link.writes == [[one, two]]
    # Framed once: every recipient is given the same bytes, not a copy of its own.
    assert alice.link.writes[0][0] is bob.link.writes[0][0] is slow.link.writes[0][0]
    # A member in its catch-up keeps the payloads in order, for later, and writes nothing.
    assert holding.link.writes == [] and holding.hold is not None
    assert holding.hold.frames == [(b'"one"', None), (b'"two"', None)]
    # Over the limit after its write: dropped as too slow; the others are not.
    assert slow.kicked and slow.kicked[0][0] == 1008
    assert not alice.kicked and not bob.kicked


async def test_within_the_delivery_window_batches_wait_and_share_one_write() -> None:
    window = 0.05
    hub = Hub(buffer_limit=1000, window=window)
    alice, bob, slow = (FakeMember(n, link=RecordingLink()) for n in ("alice", "bob", "slow"))
    room = [alice, bob, slow]
    one, two, three, ack = (frame_text(b'"%s"' % w) for w in (b"one", b"two", b"three", b"ack"))
    slow.link.stuck, slow.link.unsent = True, 1000 - len(one)  # at the limit after "one"
    hub.publish_many([(room, b'"one"', None)])
    # The first batch after a quiet spell is written at once, and a window starts.
    assert bob.link.writes == [[one]]
    hub.publish_many([(room, b'"two"', None)])
    hub.publish_many([(room, b'"three"', None), ([alice], b'"ack"', None)], now=[alice])
    # Within the window: the batches wait, but a sender gets its ack at once, with
    # what waited for it, in order.
    assert bob.link.writes == [[one]]
    assert alice.link.writes == [[one], [two, three, ack]]
    assert not slow.kicked, "what waits is checked when it is sent"
    await asyncio.sleep(window * 2)
    # The window ended: one write each for the two batches; a slow reader is dropped.
    assert bob.link.writes == [[one], [two, three]]
    assert alice.link.writes == [[one], [two, three, ack]]
    assert slow.kicked and slow.kicked[0][0] == 1008
    assert not bob.kicked and not alice.kicked
    # After a quiet spell, at once again.
    await asyncio.sleep(window * 2)
    hub.publish_many([([bob], b'"one"', None)])
    assert bob.link.writes == [[one], [two, three], [one]]


def test_without_a_window_every_batch_is_written_at_once() -> None:
    hub = Hub(buffer_limit=1000, window=0.0)  # and no event loop needed
    bob = FakeMember("bob", link=RecordingLink())
    for data in (b'"one"', b'"two"'):
        hub.publish_many([([bob], data, None)])
    assert bob.link.writes == [[frame_text(b'"one"')], [frame_text(b'"two"')]]


def test_the_delivery_window_setting() -> None:
    assert parse_config([], {}).delivery_window_ms == 10.0
    assert parse_config([], {"CHAT_DELIVERY_WINDOW_MS": "0"}).delivery_window_ms == 0.0
    assert parse_config(["--delivery-window-ms", "2.5"], {}).delivery_window_ms == 2.5
    with pytest.raises(SystemExit):
        parse_config(["--delivery-window-ms", "-1"], {})
