"""The cluster's presence view answers "is this nick live on another replica?" from an
index kept with every event (a hello asks it; a scan of every session made a hello
O(sessions in the cluster)). Pure logic: no database."""

from __future__ import annotations

from chat_server.backends.postgres import OnlineSession, PresenceEvent
from chat_server.cluster import PresenceView


def online(session: str, nick: str, replica: str, *replaced: tuple[str, str]) -> PresenceEvent:
    return PresenceEvent(
        "online",
        session=session,
        nick_key=nick.lower(),
        nick=nick,
        replica=replica,
        rooms=("lobby",),
        replaced=replaced,
    )


def live_elsewhere(view: PresenceView, *nicks: str) -> set[str]:
    return {nick for nick in nicks if view.is_online(nick.lower())}


NICKS = ("alice", "bob", "carol", "dave")


def test_a_nick_is_live_elsewhere_exactly_while_another_replica_holds_a_session_of_it() -> None:
    view = PresenceView("a")
    view.apply(online("s1", "Alice", "b"))
    view.apply(online("s2", "bob", "a"))  # this replica's own: the hub answers for those
    assert live_elsewhere(view, *NICKS) == {"alice"}
    view.apply(online("s1", "Carol", "b"))  # a nick change of a live session
    assert live_elsewhere(view, *NICKS) == {"carol"}
    view.apply(online("s3", "carol", "c"))  # a second session of the nick
    view.apply(PresenceEvent("offline", session="s1"))
    assert live_elsewhere(view, *NICKS) == {"carol"}
    view.apply(online("s4", "dave", "c", ("s3", "c")))  # replaces nothing of carol's key
    assert live_elsewhere(view, *NICKS) == {"dave"}
    view.apply(online("s5", "bob", "b", ("s2", "a")))  # a takeover from this replica
    assert live_elsewhere(view, *NICKS) == {"bob", "dave"}
    view.apply(PresenceEvent("gone", replica="c"))
    assert live_elsewhere(view, *NICKS) == {"bob"}
    view.apply(PresenceEvent("offline", session="s5"))
    view.apply(PresenceEvent("offline", session="s5"))  # twice: still nothing below zero
    assert live_elsewhere(view, *NICKS) == set()


def test_a_reloaded_view_answers_from_the_snapshot() -> None:
    view = PresenceView("a")
    view.apply(online("s1", "alice", "b"))
    view.apply(online("s2", "bob", "b"))
    snapshot = [
        OnlineSession("s2", "bob", "Bob", "b", ("lobby",)),
        OnlineSession("s3", "carol", "carol", "c", ("lobby",)),
        OnlineSession("s4", "dave", "dave", "a", ("lobby",)),
    ]
    view.reload(snapshot)
    assert live_elsewhere(view, *NICKS) == {"bob", "carol"}
