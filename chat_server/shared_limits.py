"""Limits and quotas shared by the replicas of a cluster, kept in PostgreSQL.

The :class:`~chat_server.ratelimit.Quotas` interface, so sessions do not know whether
they run alone or in a cluster. Behind HAProxy a client's connections, reconnects and
nick land on any replica, so a bucket per replica would let a nick or an address spend
its allowance once per replica. Here:

* Every quota except the HTTP flood limit is also a token bucket *in the database*. The
  replica's own bucket is always charged first, so a client over its limit is refused
  without a round trip.
* Catch-ups, new rooms and nick registrations (rare, and costly for the server) are
  then charged in the database at once, by one atomic statement whichever replica asks
  (``PostgresStore.take_tokens``): exact, cluster-wide.
* Messages (per nick, per address) are too frequent for a round trip each: what the
  local bucket grants is added up and charged every :attr:`SharedQuotas.FLUSH_EVERY`
  seconds in one statement for all keys (``PostgresStore.spend_tokens``); a key whose
  shared balance went below zero gets its local bucket lowered to that balance, so it is
  refused here too until it has refilled. The first time a replica sees a key, its
  local bucket starts from the shared balance (one round trip), so a reconnect to
  another replica starts where the last one left off. Across replicas a nick or an
  address can thus overshoot by what it sends within one flush interval, no more
  (or, when that first read takes longer than :attr:`SharedQuotas.SEED_WAIT`, by what
  it sends until the read answers: then the balance is adopted).
* ``ADDRESS_HTTP`` stays per replica: it is the flood guard, and a flood must not turn
  into database writes.
* Open connections per address are counted by each replica's connection layer
  (``connections.py``); those counts are exchanged through the database every
  :attr:`SharedQuotas.SYNC_EVERY` seconds, and the server refuses a handshake when its
  own count plus :attr:`SharedQuotas.elsewhere` reaches the limit. A burst of
  connections within that second can pass the limit by what the other replicas
  accepted meanwhile. A dead replica's counts go with it.

When the database is unreachable, the local buckets still hold (and writes fail
anyway). A request never waits long for the database's part of a quota: a send is
answered ``unavailable`` within the writer's deadline (docs/cluster.md), and a quota read
that waited for a database that answers nothing (paused, cut off) would spend that time
first. So a seed is waited for :attr:`SharedQuotas.SEED_WAIT` at most, a charge
:attr:`SharedQuotas.CHARGE_WAIT`, and neither while the store knows the database
unavailable; what the database answers later still counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

from chat_server.backends.base import StoreFailed, StoreUnavailable
from chat_server.backends.postgres import PostgresStore
from chat_server.ratelimit import Limit, Quotas, Rule

log = logging.getLogger(__name__)

T = TypeVar("T")


class SharedQuotas(Quotas):
    #: Kept per replica only (see the module docstring).
    LOCAL = frozenset({Limit.ADDRESS_HTTP})
    #: Charged to the database in batches (see the module docstring).
    BATCHED = frozenset({Limit.NICK_MESSAGES, Limit.ADDRESS_MESSAGES})
    #: Seconds between batched charges.
    FLUSH_EVERY = 0.05
    #: Seconds between exchanges of connection counts.
    SYNC_EVERY = 1.0
    #: Seconds between clean-ups of full buckets in the database.
    FORGET_EVERY = 60.0
    #: Seconds a request waits for a key's shared balance (a read by primary key), and
    #: for a charge to the database (an upsert), before its local bucket decides alone.
    SEED_WAIT = 0.1
    CHARGE_WAIT = 1.0

    def __init__(
        self,
        rules: Mapping[Limit, Rule],
        store: PostgresStore,
        replica: str,
        *,
        connections: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        super().__init__(rules)
        self.store = store
        self.replica = replica
        #: This replica's open connections per address (the connection layer's count).
        self._connections = connections
        #: Open connections per address on the other replicas, as of the last exchange.
        self.elsewhere: dict[str, int] = {}
        #: The addresses last published with a count: one that is gone is published as 0.
        self._published: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        #: Granted here, not yet charged to the database: (limit, key) -> tokens.
        self._pending: dict[tuple[Limit, str], float] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        #: Shared balances being read, per bucket; those read past SEED_WAIT.
        self._seeds: dict[tuple[Limit, str], asyncio.Task[None]] = {}
        self._late_seeds: set[asyncio.Task[None]] = set()

    # --- buckets -------------------------------------------------------------------------

    async def take(self, limit: Limit, key: str, cost: float = 1.0) -> float:
        rule = self.rules.get(limit)
        if limit in self.BATCHED and rule is not None and not rule.unlimited:
            await self._seed(limit, key)
        wait = await super().take(limit, key, cost)
        if wait or limit in self.LOCAL or rule is None or rule.unlimited:
            return wait
        if limit in self.BATCHED:
            bucket = (limit, key)
            self._pending[bucket] = self._pending.get(bucket, 0.0) + min(cost, rule.burst)
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(
                    self.FLUSH_EVERY, self._start_flush
                )
            return 0.0
        charge = partial(
            self.store.take_tokens, limit.name, key, min(cost, rule.burst), rule.rate, rule.burst
        )
        # None: the local bucket held; the database is the store's problem.
        shared = await self._within(charge, self.CHARGE_WAIT)
        if not shared:
            return 0.0
        await super().give_back(limit, key, cost)
        return shared

    async def give_back(self, limit: Limit, key: str, cost: float = 1.0) -> None:
        await super().give_back(limit, key, cost)
        rule = self.rules.get(limit)
        if limit in self.LOCAL or rule is None or rule.unlimited:
            return
        pending = self._pending.get((limit, key))
        if pending is not None:  # not charged yet: charge less
            self._pending[(limit, key)] = max(0.0, pending - cost)
            return
        give = partial(self.store.give_tokens, limit.name, key, min(cost, rule.burst))
        await self._within(give, 0)

    async def _within(self, operation: Callable[[], Awaitable[T]], wait: float) -> T | None:
        """``operation()``'s result; None if the database failed, is known unavailable, or
        did not answer within ``wait`` seconds (it goes on alone: a late charge counts)."""
        if not self.store.writable:
            return None
        task = asyncio.ensure_future(operation())
        task.add_done_callback(_retrieved)
        if wait > 0:
            await asyncio.wait({task}, timeout=wait)
        if not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    async def _seed(self, limit: Limit, key: str) -> None:
        """A key new to this replica: start its local bucket from the shared balance.

        Waited for ``SEED_WAIT`` at most, and not at all while another read is late (the
        database is slow or gone: a send must not spend its deadline here, twice).
        """
        bucket = (limit, key)
        if bucket in self._buckets or not self.store.writable:
            return
        read = self._seeds.get(bucket)
        if read is None:
            read = self._seeds[bucket] = asyncio.create_task(self._read_seed(limit, key))
        if not self._late_seeds:
            await asyncio.wait({read}, timeout=self.SEED_WAIT)
        if not read.done():
            self._late_seeds.add(read)

    async def _read_seed(self, limit: Limit, key: str) -> None:
        bucket = (limit, key)
        try:
            tokens = await self.store.tokens(limit.name, key)
        except (StoreUnavailable, StoreFailed):
            return
        finally:
            self._late_seeds.discard(self._seeds.pop(bucket))
        if tokens is None:
            return
        now = self._clock()
        if bucket in self._buckets:  # granted from a full local bucket while it was late
            tokens = min(tokens, self._tokens(limit, key, self.rules[limit], now))
        self._buckets[bucket] = (tokens, now)

    def _start_flush(self) -> None:
        self._flush = None
        task = asyncio.create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Charge what was granted here since the last flush; adopt over-limit balances."""
        pending, self._pending = self._pending, {}
        spends = [
            (limit.name, key, cost, self.rules[limit].rate, self.rules[limit].burst)
            for (limit, key), cost in pending.items()
            if cost > 0
        ]
        if not spends:
            return
        try:
            balances = await self.store.spend_tokens(spends)
        except (StoreUnavailable, StoreFailed):
            return  # the local buckets held; nothing more to do without the database
        now = self._clock()
        for name, key, tokens in balances:
            if tokens < 0:
                limit = Limit[name]
                mine = self._tokens(limit, key, self.rules[limit], now)
                self._buckets[(limit, key)] = (min(mine, tokens), now)

    # --- connections ---------------------------------------------------------------------

    async def exchange(self) -> None:
        """Publish this replica's counts; learn the others'."""
        counts = dict(self._connections())
        published = counts | {address: 0 for address in self._published - counts.keys()}
        try:
            self.elsewhere = await self.store.sync_connections(self.replica, published)
        except (StoreUnavailable, StoreFailed):
            return  # the addresses gone since the last exchange are published next time
        self._published = set(counts)

    # --- life ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shared-quotas")

    async def stop(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        since_forget = 0.0
        while True:
            await self.exchange()
            await asyncio.sleep(self.SYNC_EVERY)
            since_forget += self.SYNC_EVERY
            if since_forget >= self.FORGET_EVERY:
                since_forget = 0.0
                try:
                    await self.store.forget_full_buckets()
                except (StoreUnavailable, StoreFailed) as exc:
                    log.warning("could not forget full quota buckets: %s", exc)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a finished task's failure as seen (its caller may have stopped waiting)."""
    if not task.cancelled():
        task.exception()
