"""A takeover from another replica racing the old session's own close (attack r4, F5).

The old session's connection ends on this replica first: its rooms here are told at once
that the nick left. Then the takeover's event arrives from the stream, replacing that
session with one on another replica in the same rooms. For the cluster's view nothing
changed (one session of the nick replaced another), but this replica's members saw a
leave: they must now see the nick join again, or their member lists stay wrong.
"""

from __future__ import annotations

from typing import Any, cast

from chat_server.backends.postgres import PresenceEvent
from chat_server.cluster import Cluster
from chat_server.fanout import Hub
from tests.helpers import FakeMember


class Told:
    """The replica's presence, as far as the cluster feeds it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def remote(self, room: str, kind: str, nick: str, old: str | None = None) -> None:
        self.events.append((room, kind, nick))


class Store:
    async def session_offline(self, session: str) -> None:
        pass


def bob_here() -> tuple[Cluster, Told, FakeMember]:
    """A cluster replica "here" where bob's session s-old is live in room r."""
    told = Told()
    cluster = Cluster(cast(Any, Store()), Hub(buffer_limit=1 << 20), cast(Any, told))
    cluster.replica = "here"
    bob = FakeMember("bob")
    cluster._keys[bob] = "s-old"  # what Cluster.online records for a live session
    cluster._members["s-old"] = bob
    cluster._on_presence(online("s-old", "here", ("r",), gen=1))
    assert told.events == []  # this replica's sessions announce their own
    return cluster, told, bob


def online(session: str, replica: str, rooms: tuple[str, ...], **extra: Any) -> PresenceEvent:
    return PresenceEvent(
        "online", session=session, nick_key="bob", nick="bob", replica=replica, rooms=rooms, **extra
    )


def takeover() -> PresenceEvent:
    return online("s-new", "there", ("r", "q"), replaced=(("s-old", "here"),), gen=2)


async def test_a_leave_told_here_is_followed_by_a_join_when_the_takeover_arrives() -> None:
    cluster, told, bob = bob_here()
    cluster.offline(bob)  # bob's connection ended here; its rooms were told he left
    cluster._on_presence(takeover())
    assert sorted(told.events) == [("q", "join", "bob"), ("r", "join", "bob")]
    # Its own offline event, late on the stream, changes nothing more.
    cluster._on_presence(
        PresenceEvent("offline", session="s-old", nick_key="bob", replica="here", gen=1)
    )
    assert sorted(told.events) == [("q", "join", "bob"), ("r", "join", "bob")]


async def test_a_takeover_of_a_live_session_announces_nothing_where_it_was() -> None:
    cluster, told, bob = bob_here()
    cluster._on_presence(takeover())
    assert told.events == [("q", "join", "bob")]  # only the room the old one was not in
    assert [code for code, _ in bob.kicked] == [4001]


async def test_a_session_that_left_for_good_is_not_rejoined_by_a_later_takeover() -> None:
    cluster, told, bob = bob_here()
    cluster.offline(bob)
    cluster._on_presence(
        PresenceEvent("offline", session="s-old", nick_key="bob", replica="here", gen=1)
    )
    assert told.events == []
    cluster._on_presence(online("s-new", "there", ("r",), gen=2))
    assert told.events == [("r", "join", "bob")]  # an ordinary join, once
