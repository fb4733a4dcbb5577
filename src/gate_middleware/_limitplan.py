"""Which rate limits apply: to a request (key, accounts, model, gateway), to an attempt
at an upstream (deployment), and what a key may see of them. Built once from settings;
a request's own set is a cached tuple, looked up by its principal and model."""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from typing import NamedTuple

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute, parse_many

from ._windows import Limit, new_limit
from .auth import Principal
from .errors import ConfigurationError, NotFoundError
from .retry import Candidate
from .routing import Catalogue
from .settings import LimitSettings, RateLimitSettings

__all__ = ["LimitPlans", "RequestPlan", "slot_key"]

_MINUTE, _DAY = 60, 86400
_MAX_PLANS = 10_000  # cached per (principal, model); cleared when full


class RequestPlan(NamedTuple):
    limits: tuple[Limit, ...]  # in the order they are charged
    slot: tuple[str, int] | None  # the key's requests in flight: storage key, most at once
    single: bool  # at most one limit of each kind: each speaks for its kind's headers


class _Rules(NamedTuple):
    requests: tuple[RateLimitItem, ...]
    tokens: tuple[RateLimitItem, ...]
    concurrency: int | None


class LimitPlans:
    def __init__(
        self, settings: RateLimitSettings, catalogue: Catalogue, providers: Collection[str]
    ) -> None:
        self._catalogue = catalogue
        self._key = _rules(settings.key)
        self._models: dict[str, _Rules] = {}
        for name, limits in settings.models.items():
            try:
                model_id = catalogue.resolve(name).id
            except NotFoundError:
                raise ConfigurationError(f"Rate limits name unknown model {name!r}.") from None
            self._models[model_id] = _rules(limits)
        self._deployments: dict[str, tuple[Limit, ...]] = {}
        for name, limits in settings.deployments.items():
            if name.partition("/")[0] not in providers:
                raise ConfigurationError(
                    f"Rate limits name deployment {name!r}, whose provider is not configured "
                    f"(have: {', '.join(sorted(providers))})."
                )
            ids = ("deployment", name)
            self._deployments[name] = tuple(_limits("deployment", name, ids, _rules(limits)))
        self._gateway = tuple(_limits("gateway", "", ("gateway",), _rules(settings.gateway)))
        self._plans: dict[tuple[str, str], tuple[Principal, RequestPlan]] = {}

    def request(self, principal: Principal, model: str) -> RequestPlan:
        """A request's limits and its slot. Cached by key and model, for as long as the
        key's principal stays the same (hashing a whole principal costs more)."""
        cache_key = (principal.id, model)
        cached = self._plans.get(cache_key)
        if cached is not None:
            if cached[0] is principal:
                return cached[1]
            if cached[0] == principal:  # the same key, looked up again (a cache refresh)
                self._plans[cache_key] = (principal, cached[1])
                return cached[1]
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        model_id = None
        if model and self._models:
            with contextlib.suppress(NotFoundError):
                model_id = self._catalogue.resolve(model).id
        limits = (
            *self._key_limits(principal),
            *self._model_limits(principal, model_id),
            *self._gateway,
        )
        concurrency = self.concurrency(principal)
        slot = None if concurrency is None else (slot_key(principal), concurrency)
        kinds = [limit.kind for limit in limits]
        plan = RequestPlan(limits, slot, len(kinds) == len(set(kinds)))
        self._plans[cache_key] = (principal, plan)
        return plan

    @property
    def limits_attempts(self) -> bool:
        """Whether an attempt can meet limits of its own: an upstream's, or those of a
        model other than the one asked for (a fallback)."""
        return bool(self._deployments or self._models)

    def attempt(self, principal: Principal, asked: str, candidate: Candidate) -> tuple[Limit, ...]:
        """What one attempt is charged: its upstream's limits, and the key's limits for
        the candidate's model when it is not the model asked for (those were charged at
        admission), so a fallback named in the request escapes no model limit."""
        limits: tuple[Limit, ...] = ()
        if self._deployments:
            deployment = candidate.deployment
            name = deployment.provider_name
            limits = (
                *self._deployments.get(name, ()),
                *self._deployments.get(f"{name}/{deployment.model}", ()),
            )
        model_id = candidate.entry.id
        if model_id in self._models and model_id != self._model_id(asked):
            limits += tuple(self._model_limits(principal, model_id))
        return limits

    def _model_id(self, model: str) -> str | None:
        try:
            return self._catalogue.resolve(model).id
        except NotFoundError:
            return None

    def visible(self, principal: Principal) -> list[Limit]:
        """Every limit a key's requests can meet, for `GET /ratelimits`."""
        limits = self._key_limits(principal)
        for model_id in self._models:
            limits += self._model_limits(principal, model_id)
        limits += self._gateway
        for deployment in self._deployments.values():
            limits += deployment
        return limits

    def summary(self, principal: Principal) -> dict[str, int | None]:
        """The strictest per-minute and per-day limits on a key (its own or an account's):
        what OpenRouter-style `GET /key` reports."""
        strictest: dict[tuple[str, int], int] = {}
        for limit in self._key_limits(principal):
            slot = (limit.kind, limit.item.get_expiry())
            amount = limit.item.amount
            strictest[slot] = min(amount, strictest.get(slot, amount))
        return {
            "rpm": strictest.get(("requests", _MINUTE)),
            "tpm": strictest.get(("tokens", _MINUTE)),
            "rpd": strictest.get(("requests", _DAY)),
        }

    def concurrency(self, principal: Principal) -> int | None:
        if principal.max_concurrency is not None:
            return principal.max_concurrency
        return self._key.concurrency

    def _key_limits(self, principal: Principal) -> list[Limit]:
        rules = _Rules(
            _override(self._key.requests, {_MINUTE: principal.rpm, _DAY: principal.rpd}),
            _override(self._key.tokens, {_MINUTE: principal.tpm}),
            None,
        )
        limits = _limits("key", principal.key_hint, ("key", principal.id), rules)
        for level in reversed(principal.chain):  # the key's own account first
            rules = _Rules(
                _override((), {_MINUTE: level.rpm, _DAY: level.rpd}),
                _override((), {_MINUTE: level.tpm}),
                None,
            )
            ids = ("account", level.account_id)
            limits += _limits("account", level.account_id, ids, rules)
        return limits

    def _model_limits(self, principal: Principal, model_id: str | None) -> list[Limit]:
        rules = self._models.get(model_id or "")
        if rules is None or model_id is None:
            return []
        return _limits("model", model_id, ("model", model_id, principal.id), rules)


def slot_key(principal: Principal) -> str:
    """Where a key's requests in flight are counted."""
    return f"key/{principal.id}"


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


def _limits(scope: str, name: str, ids: tuple[str, ...], rules: _Rules) -> list[Limit]:
    return [
        new_limit(scope, name, kind, item, (*ids, kind))
        for kind, items in (("requests", rules.requests), ("tokens", rules.tokens))
        for item in items
    ]
