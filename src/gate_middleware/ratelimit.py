"""`RateLimitGuard`: requests, tokens and requests in flight, on the `limits` library.

A request counts against every limit that applies to it, in this order:
    key         the caller's key: its own limits (`Principal.rpm`...), else settings'
    account     each account above the key up to the root; every request of a
                sub-account also counts against its parent, so it never outruns it
    model       per key and model
    deployment  all keys together per upstream, to stay under the vendor's quota
    gateway     all keys together

Tokens are charged up front with an estimate (prompt + `max_tokens`, or
`completion_estimate` for a chat that names none) and corrected in `settle`:
- used more: the difference is charged. Moving and sliding windows refuse a charge
  that does not fit rather than overfill, so there the window is filled to the brim
  instead, and the key waits for it to drain.
- used less: a fixed window gets the difference back (its counter is decremented, and
  only while the window the request was charged in is still open, so no later window
  is credited). Moving and sliding windows cannot take entries back: the estimate
  stands, which errs on the safe side, never admitting more than the limit.
A refused request (here or by a later guard) gives back what it took, the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute, parse_many
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError

from ._limitstore import LimitStore, check_uri, open_store
from .auth import Principal
from .errors import ConfigurationError, NotFoundError, RateLimitError, ServiceUnavailableError
from .record import RequestRecord
from .routing import Catalogue
from .settings import LimitSettings, RateLimitSettings

__all__ = ["RateLimitGuard"]

logger = logging.getLogger("gate_middleware.ratelimit")

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}
_CHARGE = "gate.ratelimit"
_MINUTE, _DAY = 60, 86400
_MAX_PLANS = 10_000  # cached per (principal, model, deployment); cleared when full
_RETRY_STORAGE = 1.0  # seconds between attempts while the storage is down
_TTL_SLACK = 1.0  # Redis tells a window's expiry in whole seconds, rounded
_ABBREVIATIONS = {
    ("requests", _MINUTE): "RPM",
    ("tokens", _MINUTE): "TPM",
    ("requests", _DAY): "RPD",
    ("tokens", _DAY): "TPD",
}


@dataclass(frozen=True, slots=True)
class _Limit:
    scope: str
    name: str  # whose limit, as the client may see it
    kind: str  # "requests" or "tokens"
    item: RateLimitItem
    ids: tuple[str, ...]


class _Rules(NamedTuple):
    requests: tuple[RateLimitItem, ...]
    tokens: tuple[RateLimitItem, ...]
    concurrency: int | None


@dataclass(slots=True)
class _Charge:
    """What one admitted request took, so `settle` corrects or returns exactly that."""

    tokens: int
    taken: list[tuple[_Limit, int]] = field(default_factory=list)
    slot: tuple[str, str] | None = None
    at: float = 0.0


class RateLimitGuard:
    """The gateway's rate limiter; a `Guard`, opened and closed with the gateway."""

    def __init__(
        self, settings: RateLimitSettings, catalogue: Catalogue, providers: Collection[str]
    ) -> None:
        check_uri(settings.storage_uri)
        self.settings = settings
        self._fixed = settings.strategy == "fixed-window"
        self._key = _rules(settings.key)
        self._models: dict[str, _Rules] = {}
        for name, limits in settings.models.items():
            try:
                model_id = catalogue.resolve(name).id
            except NotFoundError:
                raise ConfigurationError(f"Rate limits name unknown model {name!r}.") from None
            self._models[model_id] = _rules(limits)
        self._deployments: dict[str, tuple[_Limit, ...]] = {}
        for name, limits in settings.deployments.items():
            if name.partition("/")[0] not in providers:
                raise ConfigurationError(
                    f"Rate limits name deployment {name!r}, whose provider is not configured "
                    f"(have: {', '.join(sorted(providers))})."
                )
            self._deployments[name] = tuple(
                _limits("deployment", name, ("deployment", name), _rules(limits))
            )
        self._gateway = tuple(_limits("gateway", "", ("gateway",), _rules(settings.gateway)))
        self._plans: dict[tuple[Any, ...], tuple[_Limit, ...]] = {}
        self._store: LimitStore | None = None
        self._limiter: RateLimiter | None = None
        self._down = False
        self._retry_at = 0.0

    # Lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        s = self.settings
        self._store = open_store(
            s.storage_uri,
            key_prefix=s.key_prefix,
            timeout=s.storage_timeout,
            lease=s.concurrency_lease,
        )
        self._limiter = _STRATEGIES[s.strategy](self._store.storage)

    async def aclose(self) -> None:
        if self._store is not None:
            await self._store.aclose()
            self._store = self._limiter = None

    # Guard -------------------------------------------------------------------------

    async def admit(self, record: RequestRecord) -> None:
        plan = self._plan(record)
        concurrency = self._concurrency(record.principal)
        if (not plan and concurrency is None) or self._skip_storage():
            return
        charge = _Charge(tokens=self._estimate(record))
        try:
            if concurrency is not None:
                await self._take_slot(record.principal, concurrency, charge)
            for limit in plan:
                cost = 1 if limit.kind == "requests" else charge.tokens
                if limit.kind == "tokens" and cost > limit.item.amount:
                    raise _too_large(limit, cost)
                admitted = await self._hit(limit, cost)
                if admitted or self._fixed:  # a fixed window counts even what it refuses
                    charge.taken.append((limit, cost))
                if not admitted:
                    await self._give_back(charge)
                    record.headers.update(await self._headers(plan))
                    raise await self._refusal(limit, cost, record)
            charge.at = time.time()
            record.headers.update(await self._headers(plan))
        except RateLimitError:
            await self._give_back(charge)
            raise
        except StorageError as exc:
            with contextlib.suppress(StorageError):
                await self._give_back(charge)
            self._failed(exc, refuse=True)
            return
        self._answered()
        record.extra[_CHARGE] = charge

    async def settle(self, record: RequestRecord) -> None:
        charge: _Charge | None = record.extra.pop(_CHARGE, None)
        if charge is None or self._skip_storage(refuse=False):
            return
        try:
            if record.status == 0:  # refused before the call: nothing was used
                await self._give_back(charge)
                return
            if charge.slot is not None:
                await self._store_().release(*charge.slot)
            used = _used(record, charge.tokens)
            for limit, cost in charge.taken:
                if limit.kind == "tokens" and used != cost:
                    await self._correct(limit, cost, used, charge.at)
        except StorageError as exc:
            self._failed(exc, refuse=False)

    # The query endpoint ------------------------------------------------------------

    async def snapshot(self, principal: Principal) -> dict[str, Any]:
        """A key's limits and what remains of each, for `GET /ratelimits`."""
        limits = list(self._key_limits(principal))
        for model_id in self._models:
            limits += self._model_limits(principal, model_id)
        for deployment in self._deployments.values():
            limits += deployment
        limits += self._gateway
        concurrency = self._concurrency(principal)
        try:
            now = time.time()
            data = []
            for limit in limits:
                reset, remaining = await self._limiter_().get_window_stats(limit.item, *limit.ids)
                wait = max(reset - now, 0.0)
                data.append(
                    {
                        "scope": limit.scope,
                        "name": limit.name,
                        "type": limit.kind,
                        "limit": limit.item.amount,
                        "window": _window(limit.item),
                        "window_seconds": limit.item.get_expiry(),
                        "remaining": max(remaining, 0),
                        "reset": _duration(wait),
                        "reset_seconds": round(wait, 3),
                    }
                )
            in_flight = await self._store_().count(_slot_key(principal))
        except StorageError as exc:
            self._failed(exc, refuse=False)
            raise ServiceUnavailableError(
                "Rate limits cannot be read right now: their storage is unreachable."
            ) from None
        self._answered()
        return {
            "object": "rate_limits",
            "key": principal.key_hint,
            "strategy": self.settings.strategy,
            "data": data,
            "concurrency": {"limit": concurrency, "in_flight": in_flight},
        }

    # Which limits apply ------------------------------------------------------------

    def _plan(self, record: RequestRecord) -> tuple[_Limit, ...]:
        principal = record.principal
        cache_key = (principal, record.model_id, record.provider, record.upstream_model)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            deployments = self._deployments
            plan = self._plans[cache_key] = (
                *self._key_limits(principal),
                *self._model_limits(principal, record.model_id),
                *deployments.get(record.provider or "", ()),
                *deployments.get(f"{record.provider}/{record.upstream_model}", ()),
                *self._gateway,
            )
        return plan

    def _key_limits(self, principal: Principal) -> list[_Limit]:
        rules = _Rules(
            _override(self._key.requests, {_MINUTE: principal.rpm, _DAY: principal.rpd}),
            _override(self._key.tokens, {_MINUTE: principal.tpm}),
            None,
        )
        limits = _limits("key", principal.key_hint, ("key", principal.id), rules)
        for account in principal.accounts:
            rules = _Rules(
                _override((), {_MINUTE: account.rpm, _DAY: account.rpd}),
                _override((), {_MINUTE: account.tpm}),
                None,
            )
            limits += _limits("account", account.id, ("account", account.id), rules)
        return limits

    def _model_limits(self, principal: Principal, model_id: str | None) -> list[_Limit]:
        rules = self._models.get(model_id or "")
        if rules is None:
            return []
        return _limits("model", model_id or "", ("model", model_id or "", principal.id), rules)

    def _concurrency(self, principal: Principal) -> int | None:
        if principal.max_concurrency is not None:
            return principal.max_concurrency
        return self._key.concurrency

    def _estimate(self, record: RequestRecord) -> int:
        completion = record.max_completion_tokens
        if completion is None:
            chat = record.endpoint.startswith("chat")
            completion = self.settings.completion_estimate if chat else 0
        return record.estimated_prompt_tokens + completion

    # Talking to the storage --------------------------------------------------------

    def _store_(self) -> LimitStore:
        assert self._store is not None, "the gateway's lifespan opens the limit storage"
        return self._store

    def _limiter_(self) -> RateLimiter:
        assert self._limiter is not None, "the gateway's lifespan opens the limit storage"
        return self._limiter

    async def _hit(self, limit: _Limit, cost: int) -> bool:
        return await self._limiter_().hit(limit.item, *limit.ids, cost=cost)

    async def _take_slot(self, principal: Principal, limit: int, charge: _Charge) -> None:
        key = _slot_key(principal)
        token = await self._store_().acquire(key, limit)
        if token is None:
            raise RateLimitError(
                f"Too many requests in flight for key {principal.key_hint}: at most {limit} "
                "at a time. Please try again when one of them has finished.",
                headers={"retry-after": "1"},
            )
        charge.slot = (key, token)

    async def _give_back(self, charge: _Charge) -> None:
        if charge.slot is not None:
            slot, charge.slot = charge.slot, None
            await self._store_().release(*slot)
        taken, charge.taken = charge.taken, []
        if self._fixed:
            now = time.time()
            for limit, cost in taken:
                await self._refund(limit, cost, now)

    async def _refund(self, limit: _Limit, amount: int, charged_at: float) -> None:
        """Take `amount` off a fixed window, if it is still the one that was charged."""
        storage = self._store_().storage
        key = limit.item.key_for(*limit.ids)
        count = await storage.get(key)
        if count <= 0 or amount <= 0:
            return
        opened = await storage.get_expiry(key) - limit.item.get_expiry()
        if opened - _TTL_SLACK > charged_at:
            return  # a newer window: it never counted this charge
        await storage.incr(key, limit.item.get_expiry(), amount=-min(amount, count))

    async def _correct(self, limit: _Limit, charged: int, used: int, charged_at: float) -> None:
        if used < charged:
            if self._fixed:
                await self._refund(limit, charged - used, charged_at)
            return
        more = used - charged
        if await self._hit(limit, more) or self._fixed:
            return
        _, room = await self._limiter_().get_window_stats(limit.item, *limit.ids)
        if room > 0:
            await self._hit(limit, min(more, room))

    async def _headers(self, plan: Iterable[_Limit]) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, from the limit with the least left of each kind."""
        tightest: dict[str, tuple[int, float, _Limit]] = {}
        for limit in plan:
            reset, remaining = await self._limiter_().get_window_stats(limit.item, *limit.ids)
            held = tightest.get(limit.kind)
            if held is None or remaining < held[0]:
                tightest[limit.kind] = (remaining, reset, limit)
        now = time.time()
        headers = {}
        for kind, (remaining, reset, limit) in tightest.items():
            headers.update(_openai_headers(kind, limit.item.amount, remaining, reset - now))
        return headers

    async def _refusal(self, limit: _Limit, cost: int, record: RequestRecord) -> RateLimitError:
        reset, remaining = await self._limiter_().get_window_stats(limit.item, *limit.ids)
        wait = max(reset - time.time(), 0.001)
        amount = limit.item.amount
        # The refused limit speaks for its kind, even where another has less left.
        record.headers.update(_openai_headers(limit.kind, amount, remaining, wait))
        headers = {
            "retry-after": str(math.ceil(wait)),
            "retry-after-ms": str(math.ceil(wait * 1000)),
        }
        if wait > 60:
            # The SDKs honour retry-after only up to a minute, then retry at once: in vain.
            headers["x-should-retry"] = "false"
        return RateLimitError(
            f"Rate limit reached for {_whose(limit)} on {_what(limit)}: Limit {amount}, "
            f"Used {amount - max(remaining, 0)}, Requested {cost}. "
            f"Please try again in {_duration(wait)}.",
            type=limit.kind,
            headers=headers,
        )

    # Storage outages ---------------------------------------------------------------

    def _skip_storage(self, *, refuse: bool = True) -> bool:
        """While the storage is down, do not wait on it again for a second."""
        if not self._down or time.monotonic() >= self._retry_at:
            return False
        if refuse and self.settings.on_storage_error == "closed":
            raise _unavailable()
        return True

    def _failed(self, exc: StorageError, *, refuse: bool) -> None:
        closed = self.settings.on_storage_error == "closed"
        if not self._down:
            self._down = True
            cause = exc.storage_error
            logger.error(
                "The rate-limit storage is unreachable (%s: %s); %s until it answers again.",
                type(cause).__name__,
                cause,
                "refusing requests with 503" if closed else "admitting requests unchecked",
            )
        self._retry_at = time.monotonic() + _RETRY_STORAGE
        if refuse and closed:
            raise _unavailable()

    def _answered(self) -> None:
        if self._down:
            self._down = False
            logger.warning("The rate-limit storage answers again; limits apply.")


def _rules(settings: LimitSettings) -> _Rules:
    return _Rules(
        tuple(parse_many(settings.requests)) if settings.requests else (),
        tuple(parse_many(settings.tokens)) if settings.tokens else (),
        settings.concurrency,
    )


def _override(
    items: tuple[RateLimitItem, ...], own: dict[int, int | None]
) -> tuple[RateLimitItem, ...]:
    """Settings' items, with the key's own per-minute / per-day values in their place."""
    kept = tuple(item for item in items if own.get(item.get_expiry()) is None)
    added = tuple(
        RateLimitItemPerMinute(amount) if seconds == _MINUTE else RateLimitItemPerDay(amount)
        for seconds, amount in own.items()
        if amount is not None
    )
    return kept + added


def _limits(scope: str, name: str, ids: tuple[str, ...], rules: _Rules) -> list[_Limit]:
    return [
        _Limit(scope, name, kind, item, (*ids, kind))
        for kind, items in (("requests", rules.requests), ("tokens", rules.tokens))
        for item in items
    ]


def _slot_key(principal: Principal) -> str:
    return f"key/{principal.id}"


def _used(record: RequestRecord, estimate: int) -> int:
    if record.usage_reported:
        return record.prompt_tokens + record.completion_tokens
    if record.status >= 400 and record.status != 499 and record.ttft_ms is None:
        return 0  # the upstream failed before answering anything
    return estimate  # an answer without usage, or a stream cut short: keep the estimate


def _too_large(limit: _Limit, cost: int) -> RateLimitError:
    return RateLimitError(
        f"Request too large for {_whose(limit)} on {_what(limit)}: Limit {limit.item.amount}, "
        f"Requested {cost}. Lower max_tokens or shorten the prompt.",
        type="tokens",
        headers={"x-should-retry": "false"},
    )


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "Rate limits cannot be checked right now, so this gateway refuses requests. "
        "Please try again shortly."
    )


def _whose(limit: _Limit) -> str:
    if limit.scope == "key":
        return f"key {limit.name}"
    if limit.scope == "model":
        return f"model {limit.name} on this key"
    if limit.scope == "deployment":
        return f"upstream {limit.name}"
    if limit.scope == "account":
        return f"account {limit.name}"
    return "this gateway"


def _what(limit: _Limit) -> str:
    text = f"{limit.kind} per {_window(limit.item)}"
    abbreviation = _ABBREVIATIONS.get((limit.kind, limit.item.get_expiry()))
    return f"{text} ({abbreviation})" if abbreviation else text


def _window(item: RateLimitItem) -> str:
    name = item.GRANULARITY.name
    return name if item.multiples == 1 else f"{item.multiples} {name}s"


def _openai_headers(kind: str, limit: int, remaining: int, reset_in: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(remaining, 0)),
        f"x-ratelimit-reset-{kind}": _duration(max(reset_in, 0.0)),
    }


def _duration(seconds: float) -> str:
    """OpenAI's reset format (Go's durations): "20ms", "1.5s", "6m0s", "1h2m3s"."""
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
