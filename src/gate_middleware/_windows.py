"""Charging windows: take, read what is left, adjust; and a request's slot beside them.

`FixedWindows` counts with the storage's own fixed-window counter (`limits`' `incr`),
through `LimitStore.apply`: taking a request's slot and charging all its windows is one
storage call, one Redis round trip (`FixedWindowRateLimiter.hit` would be one per
limit, and two more per limit to read the count back for the headers). A fixed
window's end never moves while it lasts, so it is read once per window and kept; its
counter can be decremented, so it can give back.

`StrategyWindows` is everything else, through the `limits` strategies themselves
(moving window, sliding window counter), one limit at a time, stopping at the first
that refuses: those keep entries they cannot take back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItem
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from ._limitstore import Count, LimitStore

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

_TTL_SLACK = 1.0  # Redis tells a key's expiry in whole seconds, rounded
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


def new_limit(scope: str, name: str, kind: str, item: RateLimitItem, ids: tuple[str, ...]) -> Limit:
    # Whose limit it is goes in the namespace: `limits` then builds no key per call.
    item = type(item)(item.amount, item.multiples, namespace="/".join(ids))
    return Limit(scope, name, kind, item, item.key_for(), item.amount, item.get_expiry())


# What a charge did: admitted?, and when known for free, what is left and when the
# window is whole again (its reset time).
Taken = tuple[bool, int | None, float | None]
# A correction: the limit, the amount (more used: positive; to give back: negative),
# and when the charge it corrects was made.
Change = tuple[Limit, int, float]


class Windows(Protocol):
    counts_refused: bool  # a refused take still counted, and must be given back

    async def take(
        self, charges: Sequence[tuple[Limit, int]], slot: tuple[str, int] | None = None
    ) -> tuple[str | None, list[Taken]]:
        """Take the slot (key, most in flight) if asked, then charge each (limit, cost):
        the slot's token (None: full, or not asked), and per charge made, in order,
        what it did. A full slot charges nothing that stays charged."""

    async def adjust(self, changes: Sequence[Change], free: tuple[str, str] | None = None) -> None:
        """Free the slot (key, token) if given, and apply the corrections the strategy
        can: more used is charged even past the limit; giving back only where the
        window that counted the charge is still open."""

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        """(reset time, remaining): when the window is whole again, and what is left."""


class FixedWindows:
    counts_refused = True

    def __init__(self, store: LimitStore) -> None:
        self._store = store
        self._storage = store.storage
        self._ends: dict[str, float] = {}

    async def take(
        self, charges: Sequence[tuple[Limit, int]], slot: tuple[str, int] | None = None
    ) -> tuple[str | None, list[Taken]]:
        counts = [(limit.key, limit.expiry, cost) for limit, cost in charges]
        token, totals = await self._store.apply(counts, take=slot)
        if slot is not None and token is None:
            await self._store.apply([(key, expiry, -cost) for key, expiry, cost in counts])
            return None, []
        now = time.time()
        taken: list[Taken] = []
        for (limit, _), total in zip(charges, totals):
            end = self._ends.get(limit.key, 0.0)
            if end - _TTL_SLACK <= now:
                end = await self._end(limit)
            taken.append((total <= limit.amount, limit.amount - total, end))
        return token, taken

    async def adjust(self, changes: Sequence[Change], free: tuple[str, str] | None = None) -> None:
        counts: list[Count] = []
        for limit, amount, charged_at in changes:
            if amount < 0 and not await self._counted(limit, charged_at):
                continue
            counts.append((limit.key, limit.expiry, amount))
        if counts or free is not None:
            await self._store.apply(counts, free=free)

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        if remaining is None:
            remaining = limit.amount - await self._storage.get(limit.key)
        return await self._end(limit), max(remaining, 0)

    async def _counted(self, limit: Limit, charged_at: float) -> bool:
        """Whether the window open now counted a charge made at `charged_at`."""
        end = await self._end(limit)
        if end - _TTL_SLACK <= time.time():
            return False  # gone, or about to go: nothing to return it to
        # Not a newer window, which never counted this charge.
        return end - limit.expiry - _TTL_SLACK <= charged_at

    async def _end(self, limit: Limit) -> float:
        end = self._ends.get(limit.key, 0.0)
        if end - _TTL_SLACK <= time.time():
            end = await self._storage.get_expiry(limit.key)
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
        for limit, cost in charges:
            admitted = await self._limiters[limit.kind].hit(limit.item, cost=cost)
            taken.append((admitted, None, None))
            if not admitted:
                break
        return token, taken

    async def adjust(self, changes: Sequence[Change], free: tuple[str, str] | None = None) -> None:
        if free is not None:
            await self._store.apply((), free=free)
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
