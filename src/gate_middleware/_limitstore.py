"""Where rate limits are kept: a `limits` async storage, and in-flight counts beside it.

`memory://` keeps both in this process. `redis://` keeps both in Redis through one
redis-py connection pool, so every worker and host shares them. `limits` has no
concurrency limiter: in Redis a slot is a member of a sorted set scored by the end of
its lease, so the slots of a worker that died free themselves when their lease ends (an
INCR/DECR counter would stay off by one forever after a crash, or reset under
requests still in flight if it expired).

Every storage failure surfaces as `limits.errors.StorageError`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from limits.aio.storage import Storage
from limits.errors import StorageError
from limits.storage import storage_from_string

from .errors import ConfigurationError

__all__ = ["LimitStore", "MemoryStore", "RedisStore", "check_uri", "open_store"]

_REDIS_SCHEMES = ("redis", "rediss", "redis+unix")
_SWEEP_EVERY = 1.0  # seconds between sweeps of expired keys in memory

# KEYS[1]: the key's slots; ARGV: limit, lease seconds, this slot's token.
# Redis's own clock, so hosts with skewed clocks agree on which leases ended.
_ACQUIRE = """
local now = redis.call('time')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('zremrangebyscore', KEYS[1], '-inf', t)
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('zadd', KEYS[1], t + tonumber(ARGV[2]), ARGV[3])
redis.call('expire', KEYS[1], math.ceil(tonumber(ARGV[2])))
return 1
"""
_COUNT = """
local now = redis.call('time')
redis.call('zremrangebyscore', KEYS[1], '-inf', tonumber(now[1]) + tonumber(now[2]) / 1000000)
return redis.call('zcard', KEYS[1])
"""


def _sweep_at_most_every(storage: Storage, seconds: float) -> None:
    """Throttle the memory storage's sweep of expired keys.

    limits 5.8 starts a sweep over every key on each hit once the last sweep is done,
    so in a server each hit costs O(keys): measured here, 15 us a hit with one key,
    140 us with 1,000 and 1.2 ms with 10,000. Reads skip expired keys by themselves;
    the sweep only frees memory, and once a second is plenty for that. Should the
    private name change, the library's own behaviour simply stays.
    """
    name = "_MemoryStorage__schedule_expiry"
    schedule = getattr(storage, name, None)
    if schedule is None:
        return
    due = 0.0

    async def throttled() -> None:
        nonlocal due
        now = time.monotonic()
        if now >= due:
            due = now + seconds
            await schedule()

    setattr(storage, name, throttled)


def _scheme(uri: str) -> str:
    return uri.removeprefix("async+").partition("://")[0]


def check_uri(uri: str) -> None:
    """Fail at construction on a storage this gateway cannot use."""
    scheme = _scheme(uri)
    if scheme == "memory":
        return
    if scheme not in _REDIS_SCHEMES:
        raise ConfigurationError(
            f"Unsupported rate-limit storage {scheme!r}: use memory:// or redis://host:port/db "
            "(also rediss://, redis+unix://)."
        )
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "A redis:// rate-limit storage needs redis-py: pip install 'gate-middleware[redis]'"
        ) from None


class MemoryStore:
    """This process only: the `limits` memory storage and a dict of in-flight counts."""

    def __init__(self) -> None:
        self.storage: Storage = storage_from_string("async+memory://")  # type: ignore[assignment]
        _sweep_at_most_every(self.storage, _SWEEP_EVERY)
        self._in_flight: dict[str, int] = {}

    async def acquire(self, key: str, limit: int) -> str | None:
        count = self._in_flight.get(key, 0)
        if count >= limit:
            return None
        self._in_flight[key] = count + 1
        return key

    async def release(self, key: str, token: str) -> None:
        count = self._in_flight.get(key, 0) - 1
        if count > 0:
            self._in_flight[key] = count
        else:
            self._in_flight.pop(key, None)

    async def count(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    async def aclose(self) -> None:
        pass


class RedisStore:
    """Shared by every process on the same Redis, through one connection pool."""

    def __init__(self, uri: str, *, key_prefix: str, timeout: float, lease: float) -> None:
        import redis.asyncio as redis

        url = uri.removeprefix("async+")
        if url.startswith("redis+unix://"):
            url = "unix://" + url.removeprefix("redis+unix://")
        self._errors = redis.RedisError
        self._pool = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        options: dict[str, Any] = {
            "implementation": "redispy",
            "key_prefix": key_prefix,
            "wrap_exceptions": True,
            "connection_pool": self._pool,
        }
        storage = storage_from_string("async+" + uri.removeprefix("async+"), **options)
        self.storage: Storage = storage  # type: ignore[assignment]
        client = redis.Redis(connection_pool=self._pool)
        self._prefix = key_prefix + ":inflight:"
        self._lease = lease
        self._acquire = client.register_script(_ACQUIRE)
        self._count = client.register_script(_COUNT)
        self._client = client

    async def acquire(self, key: str, limit: int) -> str | None:
        # A token of its own: clients may send the same x-request-id twice.
        token = uuid.uuid4().hex
        try:
            taken = await self._acquire([self._prefix + key], [limit, self._lease, token])
        except self._errors as exc:
            raise StorageError(exc) from exc
        return token if taken else None

    async def release(self, key: str, token: str) -> None:
        try:
            await self._client.zrem(self._prefix + key, token)
        except self._errors as exc:
            raise StorageError(exc) from exc

    async def count(self, key: str) -> int:
        try:
            return int(await self._count([self._prefix + key]))
        except self._errors as exc:
            raise StorageError(exc) from exc

    async def aclose(self) -> None:
        await self._pool.aclose()


LimitStore = MemoryStore | RedisStore


def open_store(uri: str, *, key_prefix: str, timeout: float, lease: float) -> LimitStore:
    """Build the store; Redis connects lazily, on the first request."""
    if _scheme(uri) == "memory":
        return MemoryStore()
    return RedisStore(uri, key_prefix=key_prefix, timeout=timeout, lease=lease)
