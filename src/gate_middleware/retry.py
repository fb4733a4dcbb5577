"""Transparent retries and fallbacks: which deployment to try next, and when.

A request's candidates are its model's deployments (weighted, health-filtered), then
the models it may fall back to: the request's own `models` array (OpenRouter's
convention) and the catalogue's `fallbacks`. An overloaded or unreachable candidate
(429, 5xx, 529, resets, timeouts) is followed at once by the next one; a candidate
tried again in the same request waits first (exponential backoff with jitter, or the
upstream's own `retry-after`, capped). Errors no retry can fix (400, 401, 403, 404,
413, 422, context length) go straight back, or to a configured context fallback.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from .errors import InvalidRequestError, NotFoundError, UpstreamError, UpstreamLimitError
from .health import HealthStore
from .routing import Catalogue, Deployment, ModelEntry

__all__ = ["ROUTING_FIELDS", "Candidate", "Outcome", "RetryPolicy", "plan", "run"]

T = TypeVar("T")
ROUTING_FIELDS = frozenset({"models", "provider"})  # ours (OpenRouter's), not the upstream's


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    deadline: float = 60.0
    backoff: float = 0.25
    backoff_max: float = 8.0
    retry_after_cap: float = 10.0

    def for_request(self, entry: ModelEntry, headers: Mapping[str, str]) -> RetryPolicy:
        """This policy as the model (`max_retries`) and the request's headers
        (`x-gate-max-retries`, `x-gate-deadline`) adjust it."""
        policy = self
        if entry.max_retries is not None:
            policy = replace(policy, max_retries=entry.max_retries)
        if (value := headers.get("x-gate-max-retries")) is not None:
            if not (value.isascii() and value.isdigit()) or int(value) > 10:
                raise InvalidRequestError(
                    "x-gate-max-retries must be an integer from 0 to 10.",
                    param="x-gate-max-retries",
                )
            policy = replace(policy, max_retries=int(value))
        if (value := headers.get("x-gate-deadline")) is not None:
            try:
                deadline = float(value)
            except ValueError:
                deadline = -1.0
            if not 0 < deadline <= 600:
                raise InvalidRequestError(
                    "x-gate-deadline must be a number of seconds above 0, at most 600.",
                    param="x-gate-deadline",
                )
            policy = replace(policy, deadline=deadline)
        return policy

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds before retry number `retry` (1-based) of a deployment already tried."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        step = min(self.backoff_max, self.backoff * 2 ** (retry - 1))
        return random.uniform(step / 2, step)  # jitter: retries do not arrive in step


@dataclass(frozen=True, slots=True)
class Candidate:
    entry: ModelEntry
    deployment: Deployment


@dataclass(slots=True)
class Outcome(Generic[T]):
    value: T
    candidate: Candidate
    attempts: int


def _routing_options(body: dict[str, Any]) -> tuple[list[str], list[str] | None, bool]:
    """OpenRouter's `models` and `provider: {order, allow_fallbacks}`, checked."""
    models = body.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise InvalidRequestError("'models' must be an array of model names.", param="models")
    provider = body.get("provider") or {}
    if not isinstance(provider, dict):
        raise InvalidRequestError("'provider' must be an object.", param="provider")
    order = provider.get("order")
    if order is not None and (
        not isinstance(order, list) or not all(isinstance(p, str) for p in order)
    ):
        raise InvalidRequestError(
            "'provider.order' must be an array of provider names.", param="provider.order"
        )
    allow = provider.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise InvalidRequestError(
            "'provider.allow_fallbacks' must be a boolean.", param="provider.allow_fallbacks"
        )
    return models, order, allow


def plan(
    catalogue: Catalogue, entry: ModelEntry, body: dict[str, Any], kind: str = "chat"
) -> list[Candidate]:
    """Every candidate for this request, in the order they will be tried; `kind` is the
    API's (`chat` or `embedding`), which a fallback serves or, not in the catalogue
    (`any`), may serve."""
    if (
        len(entry.deployments) == 1
        and not entry.fallbacks
        and not ROUTING_FIELDS.intersection(body)
    ):
        return [Candidate(entry, entry.deployments[0])]  # the common case, without the walk
    models, order, allow_fallbacks = _routing_options(body)
    entries = [entry]
    names = [*models, *(entry.fallbacks if allow_fallbacks else ())]
    for n, name in enumerate(names):
        try:
            fallback = catalogue.resolve(name)
        except NotFoundError as exc:
            if n < len(models):
                exc.param = "models"  # the request's own list named it
            raise
        if fallback not in entries and fallback.kind in (kind, "any"):
            entries.append(fallback)
    candidates = []
    for model in entries:
        deployments = model.ordered()
        if order:
            rank = {name: i for i, name in enumerate(order)}
            deployments.sort(key=lambda d: rank.get(d.provider_name, len(order)))
            if not allow_fallbacks:
                deployments = [d for d in deployments if d.provider_name in rank]
        candidates += [Candidate(model, d) for d in deployments]
    if not candidates:
        raise InvalidRequestError(
            f"No provider in 'provider.order' serves '{entry.id}', and fallbacks are off.",
            param="provider.order",
        )
    return candidates


def _context_too_long(error: UpstreamError) -> bool:
    text = f"{error.code} {error.message}".lower()
    return "context_length" in text or "context length" in text or "maximum context" in text


async def run(
    candidates: list[Candidate],
    call: Callable[[Candidate], Awaitable[T]],
    *,
    policy: RetryPolicy,
    health: HealthStore,
    catalogue: Catalogue,
    started: float,
) -> Outcome[T]:
    """Call candidates until one answers, within the policy's attempts and deadline.

    `started` is the request's arrival (`time.monotonic()`): the deadline counts from it.
    """
    deadline = started + policy.deadline
    failures: dict[int, int] = {}  # candidate index -> failed attempts in this request
    waits: dict[int, float | None] = {}  # candidate index -> the retry-after it last sent
    last: UpstreamError | None = None
    position, attempts = 0, 0
    while attempts <= policy.max_retries:
        index = _next_available(candidates, position, health)
        if index is None:
            raise last or _all_cooling(candidates, health)
        candidate = candidates[index]
        if failures.get(index):
            # Its own retry-after, not that of another candidate tried since.
            retry_after = waits.get(index)
            wait = policy.delay(failures[index], retry_after)
            too_long = (retry_after or 0) > policy.retry_after_cap
            if too_long or time.monotonic() + wait >= deadline:
                break  # the caller (or its SDK) is better placed to wait
            await asyncio.sleep(wait)
        attempts += 1
        try:
            value = await call(candidate)
        except UpstreamError as error:
            last = error
            if not error.retryable:
                # The request was at fault (a 400, a 404): the deployment answered, so
                # it is alive, which ends a half-open trial as a success would.
                if error.status < 500 and error.code != "upstream_auth_error":
                    await health.success(candidate.deployment.key)
                fallback = candidate.entry.context_fallback
                if fallback and _context_too_long(error):
                    longer = catalogue.resolve(fallback)
                    candidates[index + 1 : index + 1] = [
                        Candidate(longer, d) for d in longer.ordered()
                    ]
                    position = index + 1
                    continue
                raise
            failures[index] = failures.get(index, 0) + 1
            waits[index] = error.retry_after
            if not isinstance(error, UpstreamLimitError):  # our own limit: not its health
                await health.failure(candidate.deployment.key)
            if time.monotonic() >= deadline:
                break
            position = index + 1
            continue
        await health.success(candidate.deployment.key)
        return Outcome(value, candidate, attempts)
    assert last is not None
    raise last


def _next_available(candidates: list[Candidate], start: int, health: HealthStore) -> int | None:
    for step in range(len(candidates)):
        index = (start + step) % len(candidates)
        if not health.cooling_until(candidates[index].deployment.key):
            return index
    return None


def _all_cooling(candidates: list[Candidate], health: HealthStore) -> UpstreamError:
    soonest = min(health.cooling_until(c.deployment.key) for c in candidates)
    return UpstreamError(
        "Every deployment of this model is failing and cooling down; try again shortly.",
        status=503,
        code="no_healthy_deployment",
        retry_after=max(1.0, soonest - time.time()),
    )
