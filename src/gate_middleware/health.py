"""Deployment health: a deployment that keeps failing is skipped for a while.

N failures within a window cool a deployment down; once the cooldown ends it is
"half-open": the next request tries it, a success clears it, a failure cools it down
again at once. So a dead upstream costs one failed attempt per cooldown, not one per
request. State is in memory (one process) or in Redis (shared by workers and hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigurationError

__all__ = ["HealthStore", "MemoryHealth", "RedisHealth", "health_from_url"]

logger = logging.getLogger("gate_middleware")


@runtime_checkable
class HealthStore(Protocol):
    async def startup(self) -> None: ...

    async def aclose(self) -> None: ...

    def cooling_until(self, key: str) -> float:
        """When the deployment may be tried again (`time.time()`); 0 when it may now."""

    async def failure(self, key: str) -> None: ...

    async def success(self, key: str) -> None: ...


class MemoryHealth:
    def __init__(self, *, failures: int = 3, window: float = 30.0, cooldown: float = 30.0) -> None:
        self.failures, self.window, self.cooldown = failures, window, cooldown
        self._recent: dict[str, list[float]] = {}
        self._cooled: dict[str, float] = {}  # key -> until; kept after expiry: half-open

    async def startup(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def cooling_until(self, key: str) -> float:
        until = self._cooled.get(key, 0.0)
        if not until:
            return 0.0
        now = time.time()
        if until > now:
            return until
        # Half-open: the caller is the one trial; the others skip it until its outcome
        # (else every request meanwhile waited on a deployment that may still be dead).
        self._cooled[key] = now + self.cooldown
        return 0.0

    async def failure(self, key: str) -> None:
        now = time.time()
        if key in self._cooled:  # a half-open trial failed
            self._cool(key, now)
            return
        recent = [t for t in self._recent.get(key, ()) if t > now - self.window]
        recent.append(now)
        if len(recent) >= self.failures:
            self._recent.pop(key, None)
            self._cool(key, now)
        else:
            self._recent[key] = recent

    def _cool(self, key: str, now: float) -> None:
        self._cooled[key] = now + self.cooldown
        logger.warning("Deployment %s is cooling down for %.0f s.", key, self.cooldown)

    async def success(self, key: str) -> None:
        if key in self._cooled or key in self._recent:
            self._cooled.pop(key, None)
            self._recent.pop(key, None)


class RedisHealth:
    """Shared health. Reads come from a snapshot refreshed in the background (every
    `refresh` seconds), so the hot path never waits for Redis; failures, which are rare,
    write through at once."""

    def __init__(
        self,
        url: str,
        *,
        failures: int = 3,
        window: float = 30.0,
        cooldown: float = 30.0,
        prefix: str = "gate:health:",
        refresh: float = 0.5,
    ) -> None:
        try:
            import redis.asyncio as redis
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "Redis health storage needs redis-py: pip install 'gate-middleware[redis]'"
            ) from None
        # Timeouts: a Redis that stops answering must not hang a request or a shutdown.
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.failures, self.window, self.cooldown = failures, window, cooldown
        self._cooled_key = prefix + "cooled"
        self._count_prefix = prefix + "failures:"
        self._refresh = refresh
        self._snapshot: dict[str, float] = {}
        self._trials: dict[str, float] = {}  # half-open: key -> until, this process's trial
        self._task: asyncio.Task[None] | None = None
        self._down = False
        self._stopping = False

    async def startup(self) -> None:
        self._stopping = False
        try:
            await self._pull()
        except Exception:
            # Health is an optimisation: the gateway starts without it (all deployments
            # healthy), and the poll below picks the shared state up once Redis answers.
            logger.exception("Redis health storage is unreachable; starting without it.")
            self._down = True
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def aclose(self) -> None:
        if self._task is not None:
            # The flag as well as the cancel: redis-py may swallow a cancel that lands
            # mid-command and raise its own error, which the loop would outlive.
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def _pull(self) -> None:
        raw = await self._redis.hgetall(self._cooled_key)
        self._snapshot = {k.decode(): float(v) for k, v in raw.items()}

    async def _poll(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._refresh)
            try:
                await self._pull()
                if self._down:
                    logger.warning("Redis health storage is reachable again.")
                    self._down = False
            except Exception:
                if self._stopping:
                    return
                if not self._down:  # once per incident
                    logger.exception("Redis health storage is unreachable; using the last view.")
                    self._down = True

    def cooling_until(self, key: str) -> float:
        until = self._snapshot.get(key, 0.0)
        if not until:
            return 0.0
        now = time.time()
        if until > now:
            return until
        # Half-open: one trial per process at a time (see MemoryHealth.cooling_until).
        trial = self._trials.get(key, 0.0)
        if trial > now:
            return trial
        self._trials[key] = now + self.cooldown
        return 0.0

    async def failure(self, key: str) -> None:
        now = time.time()
        self._trials.pop(key, None)
        try:
            if key in self._snapshot:  # a half-open trial failed
                await self._cool(key, now)
                return
            count_key = self._count_prefix + key
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(count_key)
                pipe.expire(count_key, max(1, round(self.window)), nx=True)
                count, _ = await pipe.execute()
            if count >= self.failures:
                await self._redis.delete(count_key)
                await self._cool(key, now)
        except Exception:
            logger.exception("Could not record a failure of %s in Redis.", key)

    async def _cool(self, key: str, now: float) -> None:
        until = now + self.cooldown
        await self._redis.hset(self._cooled_key, key, until)
        self._snapshot[key] = until
        logger.warning("Deployment %s is cooling down for %.0f s.", key, self.cooldown)

    async def success(self, key: str) -> None:
        self._trials.pop(key, None)
        if key in self._snapshot:
            self._snapshot.pop(key, None)
            try:
                await self._redis.hdel(self._cooled_key, key)
            except Exception:
                logger.exception("Could not clear the health of %s in Redis.", key)


def health_from_url(url: str, *, failures: int, window: float, cooldown: float) -> HealthStore:
    if url.startswith("memory://"):
        return MemoryHealth(failures=failures, window=window, cooldown=cooldown)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHealth(url, failures=failures, window=window, cooldown=cooldown)
    raise ConfigurationError(f"Unknown health storage {url!r}: use memory:// or redis://.")
