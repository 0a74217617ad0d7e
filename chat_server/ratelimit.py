"""Rate limits and quotas: token buckets per connection, per nick and per address.

A :class:`TokenBucket` guards one connection (every frame costs a token). Everything
that must hold *across* connections (a nick's message rate survives a reconnect; an
address's catch-ups, new rooms and new nicks are counted whoever sends them) lives in
one :class:`Quotas` object with a two-method interface (``take``, ``give_back``), so that
a server cluster can put the same interface over a shared engine without touching its
callers. (Open connections per address are counted by the connection layer: they are a
resource of each server process.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum


class TokenBucket:
    """A client may burst up to ``capacity`` frames, then ``rate`` per second."""

    __slots__ = ("_stamp", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = time.monotonic()

    def take(self) -> float:
        """Spend one token: 0.0 if there was one, else the seconds until there will be."""
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Limit(Enum):
    """What a quota counts, and whose it is."""

    NICK_MESSAGES = "messages per nick"
    ADDRESS_MESSAGES = "messages per address"
    ADDRESS_CATCHUP = "catch-ups per address"
    ADDRESS_ROOMS = "new rooms per address"
    ADDRESS_NICKS = "nick registrations per address"
    ADDRESS_HTTP = "handshakes and health checks per address"

    #: Members are singletons, equal only to themselves: hash them by identity. (Enum's
    #: own ``__hash__`` hashes the name in Python, and every message's quota look-ups
    #: hash a limit several times: 1.3 us per message, docs/benchmarks.md.)
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Rule:
    """``burst`` tokens, refilled at ``rate`` per second; a rate of 0 means no limit."""

    rate: float
    burst: float

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0 or self.burst <= 0


class Quotas:
    """Token buckets keyed by (limit, key), shared by every connection of this server.

    Buckets are created on first use and forgotten once full again, so memory follows
    the keys that were active in the last few refill periods.
    """

    #: Look for full buckets to forget at most this often (seconds).
    SWEEP_EVERY = 10.0

    def __init__(
        self,
        rules: Mapping[Limit, Rule],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = dict(rules)
        self._clock = clock
        self._buckets: dict[tuple[Limit, str], tuple[float, float]] = {}
        self._swept = clock()

    async def take(self, limit: Limit, key: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens: 0.0 when granted, else seconds until it would be.

        A refused take spends nothing. A cost above the burst is charged as the burst
        (it could never be granted otherwise).
        """
        rule = self.rules.get(limit)
        if rule is None or rule.unlimited:
            return 0.0
        now = self._clock()
        if now - self._swept > self.SWEEP_EVERY:
            self._sweep(now)
        cost = min(cost, rule.burst)
        tokens = self._tokens(limit, key, rule, now)
        if tokens >= cost:
            self._buckets[(limit, key)] = (tokens - cost, now)
            return 0.0
        return (cost - tokens) / rule.rate

    async def give_back(self, limit: Limit, key: str, cost: float = 1.0) -> None:
        """Return tokens taken for something that turned out not to happen."""
        rule = self.rules.get(limit)
        if rule is None or rule.unlimited:
            return
        now = self._clock()
        tokens = self._tokens(limit, key, rule, now)
        self._buckets[(limit, key)] = (min(rule.burst, tokens + cost), now)

    def _tokens(self, limit: Limit, key: str, rule: Rule, now: float) -> float:
        state = self._buckets.get((limit, key))
        if state is None:
            return rule.burst
        tokens, stamp = state
        return min(rule.burst, tokens + (now - stamp) * rule.rate)

    def _sweep(self, now: float) -> None:
        self._swept = now
        full = [
            bucket
            for bucket, (tokens, stamp) in self._buckets.items()
            if tokens + (now - stamp) * self.rules[bucket[0]].rate >= self.rules[bucket[0]].burst
        ]
        for bucket in full:
            del self._buckets[bucket]
