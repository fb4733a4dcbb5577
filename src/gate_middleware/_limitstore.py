"""Where rate limits are kept: a `limits` async storage, and in-flight counts beside it.

`memory://` keeps both in this process. `redis://` keeps both in Redis through one
redis-py connection pool, so every worker and host shares them. `limits` has no
concurrency limiter: in Redis a slot is a member of a sorted set scored by the end of
its lease, so the slots of a worker that died free themselves when their lease ends (an
INCR/DECR counter would stay off by one forever after a crash, or reset under
requests still in flight if it expired).

A request touches the storage twice: `apply` takes its slot and charges its fixed
windows together, then gives the slot back with its corrections. In Redis each `apply`
is one pipelined round trip at most, the windows counted by the very script `limits`
counts them with (`incr_expire.lua`, on `limits`' own keys), so `limits` reads them
back. Measured (redis-py 8.1, loopback): about 100 us of client CPU per command, and
130 to 190 us for a pipeline of five, so the round trips, not Redis, set the cost:
`apply` calls made while a pipeline is in flight share the next one (`_redisbatch`).

Every storage failure surfaces as `limits.errors.StorageError`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from limits.aio.storage import Storage
from limits.aio.storage.redis.bridge import RedisBridge
from limits.errors import StorageError
from limits.storage import storage_from_string

from ._redisbatch import Abandoned, Batcher, Command
from .errors import ConfigurationError

__all__ = ["Count", "LimitStore", "MemoryStore", "RedisStore", "check_uri", "open_store"]

# A fixed window's counter: its key (as `limits` names it), expiry in seconds, amount added.
Count = tuple[str, int, int]

_REDIS_SCHEMES = ("redis", "rediss", "redis+unix")
_SWEEP_EVERY = 1.0  # seconds between sweeps of expired keys in memory
_MAX_BATCH = 256  # commands in one shared pipeline

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
_INCR_EXPIRE = RedisBridge.SCRIPT_INCR_EXPIRE  # `limits`' own fixed-window counter
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

    # How long before a window's end a give-back is no longer sent (it could reach the
    # next window): here none, nothing waits between the check and the counter.
    slack = 0.0

    def __init__(self) -> None:
        self.storage: Storage = storage_from_string("async+memory://")  # type: ignore[assignment]
        _sweep_at_most_every(self.storage, _SWEEP_EVERY)
        self._in_flight: dict[str, int] = {}

    async def apply(
        self,
        counts: Sequence[Count],
        *,
        take: tuple[str, int] | None = None,
        free: Sequence[tuple[str, str]] = (),
    ) -> tuple[str | None, list[int]]:
        """Free slots (key, token), take one (key, limit), add to counters: the token
        (None if the slot was full or not asked for) and each counter's new value."""
        for key, _ in free:
            self.free_slot(key)
        token = None if take is None else self.take_slot(*take)
        if not counts:
            return token, []
        incr = self.storage.incr
        totals = []
        for key, expiry, amount in counts:  # a loop: an async comprehension is a coroutine more
            totals.append(await incr(key, expiry, amount=amount))
        return token, totals

    def take_slot(self, key: str, limit: int) -> str | None:
        """A slot's token (its key: this process alone counts them), or None when full."""
        count = self._in_flight.get(key, 0)
        if count >= limit:
            return None
        self._in_flight[key] = count + 1
        return key

    def free_slot(self, key: str) -> None:
        count = self._in_flight.get(key, 0) - 1
        if count > 0:
            self._in_flight[key] = count
        else:
            self._in_flight.pop(key, None)

    async def count(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    async def expiry(self, key: str) -> float:
        """When the counter `key` ends (now, if it has none): to the microsecond."""
        return await self.storage.get_expiry(key)

    async def aclose(self) -> None:
        pass


class RedisStore:
    """Shared by every process on the same Redis, through one connection pool."""

    slack = 0.25  # a pipeline's wait behind another, and its round trip (see MemoryStore)

    def __init__(self, uri: str, *, key_prefix: str, timeout: float, lease: float) -> None:
        import redis.asyncio as redis
        from redis.exceptions import NoScriptError

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
        self._key_prefix = key_prefix
        self._prefix = key_prefix + ":inflight:"
        self._lease = lease
        self._no_script = NoScriptError
        # Script text to SHA1, which is what Redis knows a loaded script by.
        self._scripts = {
            script: client.register_script(script).sha for script in (_ACQUIRE, _INCR_EXPIRE)
        }
        self._count = client.register_script(_COUNT)
        self._client = client
        self._batch = Batcher(self._run, max_commands=_MAX_BATCH)

    async def apply(
        self,
        counts: Sequence[Count],
        *,
        take: tuple[str, int] | None = None,
        free: Sequence[tuple[str, str]] = (),
    ) -> tuple[str | None, list[int]]:
        """As `MemoryStore.apply`, in one pipeline, perhaps shared with other calls."""
        commands: list[Command] = [("ZREM", self._prefix + key, token) for key, token in free]
        token: str | None = None
        release: Abandoned | None = None
        if take is not None:
            # A token of its own: clients may send the same x-request-id twice.
            token = uuid.uuid4().hex
            slot = self._prefix + take[0]
            release = partial(self._release, len(commands), slot, token)
            acquire = self._scripts[_ACQUIRE]
            commands.append(("EVALSHA", acquire, 1, slot, take[1], self._lease, token))
        incr = self._scripts[_INCR_EXPIRE]
        prefix = self._key_prefix
        commands += [
            ("EVALSHA", incr, 1, f"{prefix}:{key}", expiry, amount)
            for key, expiry, amount in counts
        ]
        try:
            # Frees go even if this caller is cancelled: a slot must not wait for its lease.
            replies = await self._batch.run(commands, release, keep=bool(free))
        except self._errors as exc:
            raise StorageError(exc) from exc
        for reply in replies:
            if isinstance(reply, Exception):
                if release is not None:
                    release(replies)
                raise StorageError(reply) from reply
        if take is not None and replies[len(free)] != 1:
            token = None
        return token, [int(r) for r in replies[len(replies) - len(counts) :]]

    def _release(self, at: int, slot: str, token: str, replies: list[Any]) -> None:
        """Free a slot taken for a caller that is gone or failed (see `FixedWindows.take`)."""
        if replies[at] == 1:
            self._batch.post([("ZREM", slot, token)])

    async def _run(self, commands: list[Command]) -> list[Any]:
        """One pipeline: a reply per command, errors among them. A script Redis no longer
        knows (a restart, SCRIPT FLUSH) is loaded, and the commands that met it, which
        did not run, are run again, in one more round trip."""
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        missed = [n for n, reply in enumerate(replies) if isinstance(reply, self._no_script)]
        if missed:
            pipe = self._client.pipeline(transaction=False)
            for script in self._scripts:
                pipe.script_load(script)
            for n in missed:
                pipe.execute_command(*commands[n])
            again = await pipe.execute(raise_on_error=False)
            for n, reply in zip(missed, again[len(self._scripts) :]):
                replies[n] = reply
        return replies

    async def count(self, key: str) -> int:
        try:
            return int(await self._count([self._prefix + key]))
        except self._errors as exc:
            raise StorageError(exc) from exc

    async def expiry(self, key: str) -> float:
        """When the counter `key` ends, to the millisecond (`limits`' own reading is
        Redis's TTL, in whole seconds: a second window would have no time left to
        take anything back)."""
        try:
            left = await self._client.pttl(f"{self._key_prefix}:{key}")
        except self._errors as exc:
            raise StorageError(exc) from exc
        return time.time() + max(int(left), 0) / 1000

    async def aclose(self) -> None:
        await self._batch.aclose()
        await self._pool.aclose()


LimitStore = MemoryStore | RedisStore


def open_store(uri: str, *, key_prefix: str, timeout: float, lease: float) -> LimitStore:
    """Build the store; Redis connects lazily, on the first request."""
    if _scheme(uri) == "memory":
        return MemoryStore()
    return RedisStore(uri, key_prefix=key_prefix, timeout=timeout, lease=lease)
