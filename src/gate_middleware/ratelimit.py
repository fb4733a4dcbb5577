"""`RateLimitGuard`: requests, tokens and requests in flight, on the `limits` library.

A request counts against every limit that applies to it, in this order:
    key         the caller's key: its own limits (`Principal.rpm`..., the tightest of
                the key's and its accounts'), else settings'
    account     each account of the key's chain, with the account's own limits: all
                its keys and sub-accounts share them, so none outruns its parent
    model       per key and model asked for
    gateway     all keys together
and then, per attempt at an upstream (each retry and fallback too), from `reach`:
    deployment  all keys together per upstream, to stay under the vendor's quota
    model       per key, for a fallback model other than the one asked for
A full one fails the attempt like the vendor's own 429 would, so the next candidate is
tried, without marking the upstream unhealthy.

Tokens are charged up front with an estimate (prompt + `max_tokens`, or
`completion_estimate` for a chat that names none) and corrected in `settle`:
- used more: the difference is charged, even past the limit (fixed windows), or up
  to the brim (the other strategies refuse rather than overfill): the key waits.
- used less: a fixed window gets the difference back, and only while the window it
  was charged in is still open, so no later window is credited. Moving and sliding
  windows cannot take entries back: the estimate stands, which errs on the safe side.
A request refused (here or by a later guard) gives back what it took, the same way.
The x-ratelimit-* headers speak of the caller's own limits (key, account, model,
gateway); an upstream's quota shows only as a 429 once no candidate is left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from limits.errors import StorageError

from . import _limittext as text
from ._limitplan import LimitPlans, slot_key
from ._limitstore import LimitStore, check_uri, open_store
from ._windows import Change, Limit, Taken, Windows, windows_for
from .auth import Principal
from .errors import RateLimitError, UpstreamLimitError
from .record import RequestRecord
from .retry import Candidate
from .routing import Catalogue
from .settings import RateLimitSettings

__all__ = ["RateLimitGuard"]

logger = logging.getLogger("gate_middleware.ratelimit")

_CHARGE = "gate.ratelimit"
_RETRY_STORAGE = 1.0  # seconds between attempts while the storage is down
_MAX_UNFREED = 10_000  # slots to free once the storage answers; beyond, their leases end


# A limit charged: the limit, the amount, and the end of the window that counted it
# (where the strategy knows it), so that only that window gets anything back.
_Charged = tuple[Limit, int, float | None]


@dataclass(slots=True)
class _Charge:
    """What one admitted request took, so `settle` corrects or returns exactly that."""

    tokens: int
    taken: list[_Charged]
    slot: tuple[str, str] | None  # storage key, token
    # Per attempt at an upstream: what its limits took.
    attempts: list[list[_Charged]]


class RateLimitGuard:
    """The gateway's rate limiter; a `Guard`, opened and closed with the gateway."""

    def __init__(
        self, settings: RateLimitSettings, catalogue: Catalogue, providers: Collection[str]
    ) -> None:
        check_uri(settings.storage_uri)
        self.settings = settings
        self._plans = LimitPlans(settings, catalogue, providers)
        self._store: LimitStore | None = None
        self._windows: Windows | None = None
        self._down = False
        self._retry_at = 0.0
        self._unfreed: list[tuple[str, str]] = []  # see `_unfree`

    # Lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        s = self.settings
        self._store = open_store(
            s.storage_uri,
            key_prefix=s.key_prefix,
            timeout=s.storage_timeout,
            lease=s.concurrency_lease,
        )
        self._windows = windows_for(s.strategy, self._store)

    async def aclose(self) -> None:
        if self._windows is not None:
            await self._windows.aclose()
        if self._store is not None:
            await self._store.aclose()
            self._store = None

    # Guard -------------------------------------------------------------------------

    async def admit(self, record: RequestRecord) -> None:
        plan, slot, single = self._plans.request(record.principal, record.model)
        if record.parent_id is not None:
            slot = None  # a guarded host route's call: the route's request holds the slot
        if (not plan and slot is None) or (self._down and self._skip_storage()):
            return
        charge = _Charge(self._estimate(record), [], None, [])
        windows = self._windows
        assert windows is not None, "the gateway's lifespan opens the limit storage"
        if self._unfreed:  # before this request's take, which may want one of them
            await self._free_unfreed()
        try:
            charges = _charges(plan, charge.tokens, whole=True)
            token, taken = await windows.take(charges, slot)
            if slot is not None:
                if token is None:
                    raise text.too_many_in_flight(record.principal.key_hint, slot[1])
                charge.slot = (slot[0], token)
            charged, refused, told = charge.taken, None, single
            counts_refused = windows.counts_refused
            own: dict[str, str] = {}  # the request's, unless it is refused
            now = time.time()
            for (limit, cost), (admitted, remaining, end) in zip(charges, taken):
                if admitted or counts_refused:
                    charged.append((limit, cost, end))
                if not admitted and refused is None:
                    refused = (limit, cost)
                if told:  # each limit alone of its kind: its own headers, in passing
                    if remaining is None or end is None:
                        told = False  # a strategy that does not tell: `_headers` asks
                    else:
                        text.openai_headers(own, limit, remaining, end - now)
            if refused is not None:
                raise await self._refusal(record, *refused, charge)
            if told and len(taken) == len(plan):
                record.headers.update(own)
            else:
                await self._headers(plan, taken, record.headers)
        except RateLimitError:
            with contextlib.suppress(StorageError):  # the refusal stands either way
                await self._give_back(charge)
                every: dict[str, str] = {}
                await self._headers(plan, (), every)
                record.headers.update({**every, **record.headers})
            raise
        except StorageError as exc:
            with contextlib.suppress(StorageError):
                await self._give_back(charge)
            self._failed(exc, refuse=True)
            return
        except BaseException:
            # Cancelled midway: no `settle` will come, so what was taken goes back now.
            with anyio.CancelScope(shield=True), contextlib.suppress(StorageError):
                await self._give_back(charge)
            raise
        if self._down:
            self._answered()
        record.extra[_CHARGE] = charge

    async def settle(self, record: RequestRecord) -> None:
        charge: _Charge | None = record.extra.pop(_CHARGE, None)
        if charge is None:
            return
        slot = charge.slot
        if self._down and self._skip_storage(refuse=False):
            self._unfree(slot)
            return
        try:
            if record.status == 0:  # refused before the call: nothing was used
                await self._give_back(charge)
                return
            used = _used(record)
            changes = _corrections(charge.taken, used)
            if charge.attempts:
                last = len(charge.attempts)
                for number, taken in enumerate(charge.attempts, 1):
                    # Only the last attempt can have answered; the others made nothing.
                    changes += _corrections(taken, used if number == last else 0)
            charge.slot = None
            if changes or slot is not None:
                await self._windows_().adjust(changes, slot)
        except StorageError as exc:
            self._unfree(slot)
            self._failed(exc, refuse=False)

    def _unfree(self, slot: tuple[str, str] | None) -> None:
        """A slot whose freeing did not reach the storage (out of reach): freed once it
        answers again (freeing twice is harmless), not held until its lease ends."""
        if slot is not None and len(self._unfreed) < _MAX_UNFREED:
            self._unfreed.append(slot)

    async def _free_unfreed(self) -> None:
        frees, self._unfreed = self._unfreed, []
        if frees:
            try:
                await self._store_().apply((), free=frees)
            except StorageError:
                self._unfreed[:0] = frees  # the next time it answers

    async def tell(self, record: RequestRecord) -> None:
        """OpenAI's headers for a request refused before admission (a bad body, an
        unknown model): what is left of its key's limits, charged nothing."""
        plan = self._plans.request(record.principal, record.model).limits
        if not plan or (self._down and self._skip_storage(refuse=False)):
            return
        try:
            await self._headers(plan, (), record.headers)
        except StorageError as exc:
            self._failed(exc, refuse=False)

    @property
    def limits_attempts(self) -> bool:
        """Whether an attempt can meet limits of its own (see `reach`)."""
        return self._plans.limits_attempts

    async def reach(self, record: RequestRecord, candidate: Candidate) -> None:
        """Charge one attempt's own limits (its upstream's; a fallback model's); raise
        `UpstreamLimitError` (a 429 the retry loop answers with the next candidate) when
        one is full."""
        limits = self._plans.attempt(record.principal, record.model, candidate)
        charge = record.extra.get(_CHARGE)
        if not limits or self._skip_storage():
            if charge is not None and charge.attempts:
                # This attempt took nothing; the one before it did, and did not answer.
                charge.attempts.append([])
            return
        if charge is None:
            charge = record.extra[_CHARGE] = _Charge(self._estimate(record), [], None, [])
        charges = _charges(limits, charge.tokens, whole=False)
        windows = self._windows_()
        try:
            _, results = await windows.take(charges)
            taken = [
                (limit, cost, end)
                for (limit, cost), (admitted, _, end) in zip(charges, results)
                if admitted or windows.counts_refused
            ]
            for (limit, cost), (admitted, _, _) in zip(charges, results):
                if admitted:
                    continue
                await windows.adjust([(lim, -n, end) for lim, n, end in taken])
                reset, remaining = await windows.stats(limit)
                refused = text.refused(limit, cost, reset, remaining)
                raise UpstreamLimitError(
                    refused.message,
                    type=limit.kind,
                    retry_after=max(reset - time.time(), 0.001),
                )
        except StorageError as exc:
            self._failed(exc, refuse=True)
            return
        self._answered()
        charge.attempts.append(taken)

    # The query endpoint ------------------------------------------------------------

    def summary(self, principal: Principal) -> dict[str, int | None]:
        """A key's strictest requests and tokens per minute, requests per day."""
        return self._plans.summary(principal)

    async def snapshot(self, principal: Principal) -> dict[str, Any]:
        """A key's limits and what remains of each, for `GET /ratelimits`."""
        limits = self._plans.visible(principal)
        concurrency = self._plans.concurrency(principal)
        try:
            await self._windows_().flush()  # what this process's requests gave back
            now = time.time()
            data = []
            for limit in limits:
                reset, remaining = await self._windows_().stats(limit)
                wait = max(reset - now, 0.0)
                data.append(
                    {
                        "scope": limit.scope,
                        "name": limit.name,
                        "type": limit.kind,
                        "limit": limit.item.amount,
                        "window": text.window(limit.item),
                        "window_seconds": limit.item.get_expiry(),
                        "remaining": remaining,
                        "reset": text.duration(wait),
                        "reset_seconds": round(wait, 3),
                    }
                )
            in_flight = await self._store_().count(slot_key(principal))
        except StorageError as exc:
            self._failed(exc, refuse=False)
            raise text.unavailable("read") from None
        self._answered()
        return {
            "object": "rate_limits",
            "key": principal.key_hint,
            "strategy": self.settings.strategy,
            "data": data,
            "concurrency": {"limit": concurrency, "in_flight": in_flight},
        }

    # Charging ----------------------------------------------------------------------

    def _estimate(self, record: RequestRecord) -> int:
        completion = record.max_completion_tokens
        if completion is None:
            chat = record.endpoint.startswith("chat")
            completion = self.settings.completion_estimate if chat else 0
        return record.estimated_prompt_tokens + completion * record.choices

    def _store_(self) -> LimitStore:
        assert self._store is not None, "the gateway's lifespan opens the limit storage"
        return self._store

    def _windows_(self) -> Windows:
        assert self._windows is not None, "the gateway's lifespan opens the limit storage"
        return self._windows

    async def _give_back(self, charge: _Charge) -> None:
        slot, charge.slot = charge.slot, None
        taken, charge.taken = charge.taken, []
        if taken or slot is not None:
            changes = [(limit, -cost, end) for limit, cost, end in taken]
            await self._windows_().adjust(changes, slot)

    async def _headers(
        self, plan: Sequence[Limit], taken: Sequence[Taken], into: dict[str, str]
    ) -> None:
        """OpenAI's x-ratelimit-* headers, from the limit with the least left of each kind;
        `taken` tells what is left where the charge already knows it."""
        tightest: dict[str, tuple[int, float, Limit]] = {}
        for n, limit in enumerate(plan):
            _, remaining, reset = taken[n] if n < len(taken) else (True, None, None)
            if remaining is None or reset is None:
                reset, remaining = await self._windows_().stats(limit)
            held = tightest.get(limit.kind)
            if held is None or remaining < held[0]:
                tightest[limit.kind] = (remaining, reset, limit)
        now = time.time()
        for remaining, reset, limit in tightest.values():
            text.openai_headers(into, limit, remaining, reset - now)

    async def _refusal(
        self, record: RequestRecord, limit: Limit, cost: int, charge: _Charge
    ) -> RateLimitError:
        """Give back what was taken, then say what was refused."""
        await self._give_back(charge)
        reset, remaining = await self._windows_().stats(limit)
        # The refused limit speaks for its kind, even where another has less left.
        wait = reset - time.time()
        text.openai_headers(record.headers, limit, remaining, wait)
        return text.refused(limit, cost, reset, remaining)

    # Storage outages ---------------------------------------------------------------

    def _skip_storage(self, *, refuse: bool = True) -> bool:
        """While the storage is down, do not wait on it again for a second."""
        if not self._down or time.monotonic() >= self._retry_at:
            return False
        if refuse and self.settings.on_storage_error == "closed":
            raise text.unavailable("checked")
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
            raise text.unavailable("checked")

    def _answered(self) -> None:
        if self._down:
            self._down = False
            logger.warning("The rate-limit storage answers again; limits apply.")


def _charges(limits: Sequence[Limit], tokens: int, *, whole: bool) -> list[tuple[Limit, int]]:
    """What each limit is charged: a request, or the request's token estimate. `whole`:
    refuse for good an estimate larger than a whole window (an upstream's limit
    instead refuses the attempt, and the next candidate is tried)."""
    charges = []
    for limit in limits:
        if limit.kind == "requests":
            charges.append((limit, 1))
        elif whole and tokens > limit.amount:
            raise text.too_large(limit, tokens)
        else:
            charges.append((limit, tokens))
    return charges


def _corrections(taken: Sequence[_Charged], used: int) -> list[Change]:
    """Bring token charges to what was used (see the module's docstring)."""
    return [
        (limit, used - cost, end)
        for limit, cost, end in taken
        if limit.kind == "tokens" and used != cost
    ]


def _used(record: RequestRecord) -> int:
    if record.usage_reported:
        return record.prompt_tokens + record.completion_tokens
    if record.usage_estimated:  # an answer without usage, or a stream cut short
        return record.estimated_prompt_tokens + record.estimated_completion_tokens
    return 0  # the upstream failed before answering anything
