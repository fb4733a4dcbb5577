"""Charging a limit's window: take, read what is left, give back, add more.

`FixedWindows` calls the storage's own counter: `FixedWindowRateLimiter.hit` is one
`incr` compared with the limit, but it drops the count, and reading the count back
costs `get_window_stats` two more storage calls per limit (three Redis round trips
where one does). A fixed window's end never moves while it lasts, so it is read once
per window and kept. Its counter can also be decremented, so it can give back.

`StrategyWindows` is everything else, through the `limits` strategies themselves
(moving window, sliding window counter). Those keep entries they cannot take back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItem
from limits.aio.storage import Storage
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

__all__ = ["FixedWindows", "Limit", "StrategyWindows", "Windows", "new_limit", "windows_for"]

_TTL_SLACK = 1.0  # Redis tells a key's expiry in whole seconds, rounded
_MAX_ENDS = 100_000  # window ends kept; cleared when full


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # key, account, model, deployment, gateway
    name: str  # whose limit, as the client may see it
    kind: str  # "requests" or "tokens"
    item: RateLimitItem  # namespaced by whose it is, so no identifiers per call
    key: str  # its storage key


def new_limit(scope: str, name: str, kind: str, item: RateLimitItem, ids: tuple[str, ...]) -> Limit:
    # Whose limit it is goes in the namespace: `limits` then builds no key per call.
    item = type(item)(item.amount, item.multiples, namespace="/".join(ids))
    return Limit(scope, name, kind, item, item.key_for())


class Windows(Protocol):
    counts_refused: bool  # a refused take still counted, and must be given back
    gives_back: bool

    async def take(self, limit: Limit, cost: int) -> tuple[bool, int | None]:
        """Charge `cost` if it fits: admitted?, and what is left when known for free."""

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        """(reset time, remaining): when the window is whole again, and what is left."""

    async def give_back(self, limit: Limit, amount: int, charged_at: float) -> None:
        """Return `amount` charged at `charged_at`, where the strategy can."""

    async def add(self, limit: Limit, amount: int) -> None:
        """Charge `amount` used beyond what was taken, however much room is left."""


class FixedWindows:
    counts_refused = True
    gives_back = True

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._ends: dict[str, float] = {}

    async def take(self, limit: Limit, cost: int) -> tuple[bool, int | None]:
        count = await self._storage.incr(limit.key, limit.item.get_expiry(), amount=cost)
        return count <= limit.item.amount, limit.item.amount - count

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        if remaining is None:
            remaining = limit.item.amount - await self._storage.get(limit.key)
        return await self._end(limit), max(remaining, 0)

    async def give_back(self, limit: Limit, amount: int, charged_at: float) -> None:
        end = await self._end(limit)
        if end - _TTL_SLACK <= time.time():
            return  # gone, or about to go: nothing to return it to
        if end - limit.item.get_expiry() - _TTL_SLACK > charged_at:
            return  # a newer window, which never counted this charge
        await self._storage.incr(limit.key, limit.item.get_expiry(), amount=-amount)

    async def add(self, limit: Limit, amount: int) -> None:
        await self._storage.incr(limit.key, limit.item.get_expiry(), amount=amount)

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
    gives_back = False

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def take(self, limit: Limit, cost: int) -> tuple[bool, int | None]:
        return await self._limiter.hit(limit.item, cost=cost), None

    async def stats(self, limit: Limit, remaining: int | None = None) -> tuple[float, int]:
        reset, left = await self._limiter.get_window_stats(limit.item)
        return reset, max(left, 0)

    async def give_back(self, limit: Limit, amount: int, charged_at: float) -> None:
        pass  # these windows keep their entries: the charge stands, erring safe

    async def add(self, limit: Limit, amount: int) -> None:
        if await self._limiter.hit(limit.item, cost=amount):
            return
        # It does not fit, and these windows refuse rather than overfill: fill to the brim.
        _, room = await self._limiter.get_window_stats(limit.item)
        if room > 0:
            await self._limiter.hit(limit.item, cost=min(amount, room))


def windows_for(strategy: str, kind: str, storage: Storage) -> Windows:
    """The windows for one kind of limit.

    A moving window keeps one entry per unit counted: fine for requests, but a token
    limit would keep one per token (measured: milliseconds a request), so token
    limits count in sliding windows under that strategy.
    """
    if strategy == "fixed-window":
        return FixedWindows(storage)
    if strategy == "moving-window" and kind == "requests":
        return StrategyWindows(MovingWindowRateLimiter(storage))
    return StrategyWindows(SlidingWindowCounterRateLimiter(storage))
