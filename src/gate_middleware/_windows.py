"""Charging windows: take, read what is left, adjust; and a request's slot beside them.

`FixedWindows` counts with the storage's own fixed-window counter (`limits`' `incr`),
through `LimitStore.apply`: taking a request's slot and charging all its windows is one
storage call, one Redis round trip (`FixedWindowRateLimiter.hit` would be one per
limit, and two more per limit to read the count back for the headers). A fixed
window's end never moves while it lasts, so it is read once per window and kept; its
counter can be decremented, so it can give back.

Tokens a request gives back when it ends wait for the next storage call, at most
`_DEFER` seconds, and ride along with it: into the same counter's next charge, or the
same pipeline. Unless the request has a slot to free (which goes at once, so another
worker never finds it taken), it then costs one storage call, not two. Meanwhile the
windows show a little less room than there is, never more; reads from this process
(`stats`, `flush`) send what waits first. In memory there is no round trip to save: the
slot is taken and freed in passing, and each counter goes straight to `limits`.

`StrategyWindows` is everything else, through the `limits` strategies themselves
(moving window, sliding window counter), one limit at a time, stopping at the first
that refuses: those keep entries they cannot take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
from limits import RateLimitItem
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError

from ._limitstore import Count, LimitStore, MemoryStore

__all__ = [
    "Change",
    "FixedWindows",
    "Limit",
    "StrategyWindows",
    "Taken",
    "Windows",
    "new_limit",
    "windows_for",
]

logger = logging.getLogger("gate_middleware.ratelimit")

_DEFER = 0.05  # seconds what a request gives back may wait for the next storage call
_MAX_ENDS = 100_000  # window ends kept; cleared when full


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # key, account, model, deployment, gateway
    name: str  # whose limit, as the client may see it
    kind: str  # "requests" or "tokens"
    item: RateLimitItem  # namespaced by whose it is, so no identifiers per call
    key: str  # its storage key
    amount: int  # the item's, read on every request
    expiry: int  # the window's length in seconds
    headers: tuple[str, str, str]  # OpenAI's x-ratelimit-{limit,remaining,reset}-<kind>
    amount_text: str  # the x-ratelimit-limit-<kind> value


def new_limit(scope: str, name: str, kind: str, item: RateLimitItem, ids: tuple[str, ...]) -> Limit:
    # Whose limit it is goes in the namespace: `limits` then builds no key per call.
    item = type(item)(item.amount, item.multiples, namespace="/".join(ids))
    headers = (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    return Limit(
        scope,
        name,
        kind,
        item,
        item.key_for(),
        item.amount,
        item.get_expiry(),
        headers,
        str(item.amount),
    )


# What a charge did: admitted?, and when known for free, what is left and when the
# window is whole again (its reset time).
Taken = tuple[bool, int | None, float | None]
# A correction: the limit, the amount (more used: positive; to give back: negative),
# and the end of the window that counted the charge it corrects (a `Taken`'s).
Change = tuple[Limit, int, float | None]


class Windows(Protocol):
    counts_refused: bool  # a refused take still counted, and must be given back

    async def take(
        self, charges: Sequence[tuple[Limit, int]], slot: tuple[str, int] | None = None
    ) -> tuple[str | None, list[Taken]]:
        """Take the slot (key, most in flight) if asked, then charge each (limit, cost):
        the slot's token (None: full, or not asked), and per charge made, in order,
        what it did. A full slot charges nothing that stays charged; a storage error
        leaves no slot taken."""

    async def adjust(self, changes: Sequence[Change], free: tuple[str, str] | None = None) -> None:
        """Free the slot (key, token) if given, and apply the corrections the strategy
        can: more used is charged even past the limit; giving back only where the
        window that counted the charge is still open."""

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        """(reset time, remaining): when the window is whole again, and what is left."""

    async def flush(self) -> None:
        """Send whatever waits (see the module's docstring)."""

    async def aclose(self) -> None:
        """Send whatever waits, before the storage closes."""


class FixedWindows:
    counts_refused = True

    def __init__(self, store: LimitStore) -> None:
        self._store = store
        self._storage = store.storage
        # In this process alone: no round trip to share, so no list of counts to build.
        self._here = store if isinstance(store, MemoryStore) else None
        self._slack = store.slack
        self._ends: dict[str, float] = {}
        # Give-backs waiting to be sent, per counter: (limit, amount, its window's end).
        self._owed: dict[str, tuple[Limit, int, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    async def take(
        self, charges: Sequence[tuple[Limit, int]], slot: tuple[str, int] | None = None
    ) -> tuple[str | None, list[Taken]]:
        if self._here is not None:
            return await self._take_here(self._here, charges, slot)
        owed = self._owed
        if owed:
            # What waits goes along: into the charge of the same counter, or after them.
            counts = []
            now = time.time()
            for limit, cost in charges:
                held = owed.pop(limit.key, None)
                if held is not None and held[2] - self._slack > now:
                    cost += held[1]
                counts.append((limit.key, limit.expiry, cost))
            if owed:
                counts += self._due().values()
        else:
            counts = [(limit.key, limit.expiry, cost) for limit, cost in charges]
        token, totals = await self._store.apply(counts, take=slot)
        try:
            now = time.time()
            taken: list[Taken] = []
            for (limit, _), total in zip(charges, totals):
                end = self._ends.get(limit.key, 0.0)
                if end - self._slack <= now:
                    end = await self._end(limit)
                taken.append((total <= limit.amount, limit.amount - total, end))
        except BaseException:
            if slot is not None and token is not None:
                await _free_untold(self._store, slot[0], token)
            raise
        if slot is not None and token is None:
            # Where the window that counted it is still open (see `adjust`).
            back = [
                (limit.key, limit.expiry, -cost)
                for (limit, cost), (_, _, end) in zip(charges, taken)
                if end is not None and end - self._slack > now
            ]
            if back:
                await self._store.apply(back)
            return None, []
        return token, taken

    async def _take_here(
        self, store: MemoryStore, charges: Sequence[tuple[Limit, int]], slot: tuple[str, int] | None
    ) -> tuple[str | None, list[Taken]]:
        """`take` in this process: the slot first (a full one charges nothing), then each
        counter, with what it is owed."""
        token = None
        if slot is not None:
            token = store.take_slot(*slot)
            if token is None:
                return None, []
        owed, ends, incr = self._owed, self._ends, self._storage.incr
        taken: list[Taken] = []
        try:
            now = time.time()
            for limit, cost in charges:
                key = limit.key
                if owed:  # no slack here (MemoryStore.slack)
                    held = owed.pop(key, None)
                    if held is not None and held[2] > now:
                        cost += held[1]
                total = await incr(key, limit.expiry, amount=cost)
                end = ends.get(key, 0.0)
                if end <= now:
                    end = await self._end(limit)
                taken.append((total <= limit.amount, limit.amount - total, end))
        except BaseException:
            if token is not None:
                store.free_slot(token)
            raise
        return token, taken

    async def adjust(self, changes: Sequence[Change], free: tuple[str, str] | None = None) -> None:
        counts: list[Count] = []
        now = time.time()
        for limit, amount, end in changes:
            if amount > 0:
                counts.append((limit.key, limit.expiry, amount))
            elif end is not None and end - self._slack > now:
                # The window that counted the charge is open (a fixed window's counter
                # is that window until it ends): it takes the amount back. Once it is
                # gone, or about to go, nothing is returned, least of all to the next.
                held = self._owed.get(limit.key)
                if held is not None:
                    amount, end = amount + held[1], min(end, held[2])
                self._owed[limit.key] = (limit, amount, end)
        # More used is charged at once: the next request must not find room it lacks.
        here = self._here
        if here is not None:
            if free is not None:
                here.free_slot(free[0])
            for key, expiry, amount in counts:
                await self._storage.incr(key, expiry, amount=amount)
        elif counts or free is not None:
            counts += self._due().values()  # a round trip all the same: what waits goes along
            await self._store.apply(counts, free=() if free is None else (free,))
        if self._owed and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_DEFER, self._flush_soon)

    async def flush(self) -> None:
        owed = self._due()
        if owed:
            await self._store.apply(list(owed.values()))

    def _due(self) -> dict[str, Count]:
        """What is owed, as counts, leaving out give-backs whose window has ended."""
        now = time.time()
        owed, self._owed = self._owed, {}
        return {
            key: (key, limit.expiry, amount)
            for key, (limit, amount, end) in owed.items()
            if end - self._slack > now
        }

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._flush_quietly())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except StorageError as exc:
            # Lost: those counters show less room than there is until their window ends.
            logger.debug("Sending what requests gave back failed: %s", exc)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._flushing):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush_quietly()

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        if remaining is None:
            if limit.key in self._owed:
                await self.flush()
            remaining = limit.amount - await self._storage.get(limit.key)
        return await self._end(limit), max(remaining, 0)

    async def _end(self, limit: Limit) -> float:
        end = self._ends.get(limit.key, 0.0)
        if end - self._slack <= time.time():
            end = await self._store.expiry(limit.key)
            if len(self._ends) >= _MAX_ENDS:
                self._ends.clear()
            self._ends[limit.key] = end
        return end


class StrategyWindows:
    counts_refused = False

    def __init__(self, store: LimitStore, requests: RateLimiter, tokens: RateLimiter) -> None:
        self._store = store
        self._limiters = {"requests": requests, "tokens": tokens}

    async def take(
        self, charges: Sequence[tuple[Limit, int]], slot: tuple[str, int] | None = None
    ) -> tuple[str | None, list[Taken]]:
        token = None
        if slot is not None:
            token, _ = await self._store.apply((), take=slot)
            if token is None:
                return None, []
        taken: list[Taken] = []
        try:
            for limit, cost in charges:
                admitted = await self._limiters[limit.kind].hit(limit.item, cost=cost)
                taken.append((admitted, None, None))
                if not admitted:
                    break
        except BaseException:
            if slot is not None and token is not None:
                await _free_untold(self._store, slot[0], token)
            raise
        return token, taken

    async def adjust(self, changes: Sequence[Change], free: tuple[str, str] | None = None) -> None:
        if free is not None:
            await self._store.apply((), free=[free])
        # Entries cannot be taken back: a charge given back stands, erring safe.
        for limit, amount, _ in changes:
            if amount <= 0:
                continue
            limiter = self._limiters[limit.kind]
            if await limiter.hit(limit.item, cost=amount):
                continue
            # It does not fit, and these windows refuse rather than overfill: fill to the brim.
            _, room = await limiter.get_window_stats(limit.item)
            if room > 0:
                await limiter.hit(limit.item, cost=min(amount, room))

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        reset, left = await self._limiters[limit.kind].get_window_stats(limit.item)
        return reset, max(left, 0)

    async def flush(self) -> None:
        pass  # nothing waits: these windows give nothing back

    async def aclose(self) -> None:
        pass


async def _free_untold(store: LimitStore, key: str, token: str) -> None:
    """Free a slot taken for a caller that will never know it: a storage failure, or the
    caller cancelled (a host's timeout, a shutdown) after the take. Shielded, or a
    cancelled caller could not free it; else held until its lease ends (in memory: for
    ever)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(StorageError):
        await store.apply((), free=[(key, token)])


def windows_for(strategy: str, store: LimitStore) -> Windows:
    """The windows of a strategy.

    A moving window keeps one entry per unit counted: fine for requests, but a token
    limit would keep one per token (measured: milliseconds a request), so token
    limits count in sliding windows under that strategy.
    """
    if strategy == "fixed-window":
        return FixedWindows(store)
    tokens = SlidingWindowCounterRateLimiter(store.storage)
    if strategy == "moving-window":
        return StrategyWindows(store, MovingWindowRateLimiter(store.storage), tokens)
    return StrategyWindows(store, tokens, tokens)
