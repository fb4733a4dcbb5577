"""Balance and usage in the shapes existing tools read.

OpenAI / one-api: `GET /dashboard/billing/subscription` (`hard_limit_usd`, USD) and
`GET /dashboard/billing/usage?start_date=&end_date=` (`total_usage` in cents, end date
exclusive). OpenRouter: `GET /key`, `GET /credits`, `GET /generation?id=`.
All answer for the caller's own account.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._context import named
from ..errors import InvalidRequestError, NotFoundError
from ..pricing import NANOS_PER_USD, usd
from ..storage import Account, LedgerQuery, LedgerRow
from ..storage._common import MAX_TIME

if TYPE_CHECKING:
    from ..accounting import Accounting
    from ..app import Gateway
    from ..auth import Principal

__all__ = ["BillingAPI", "billing_routes", "iso", "parse_date"]

_NANOS_PER_CENT = NANOS_PER_USD // 100
_DAY = 86_400


def parse_date(request: Request, name: str) -> float | None:
    """A `YYYY-MM-DD` (UTC midnight) or Unix-seconds query parameter; seconds from 0 to
    the end of the year 9999, as only those render as dates (`1e300` or `inf` did not)."""
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if 0 <= seconds <= MAX_TIME:  # not NaN or an infinity either
            return seconds
        raise _bad_date(name)
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise _bad_date(name) from None
    return float(calendar.timegm(day.timetuple()))


def _bad_date(name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid '{name}': expected a date like 2025-01-31, or Unix seconds up to the year 9999.",
        param=name,
    )


def iso(seconds: float) -> str:
    # A time stored before input was bounded (an `expires_at` of 1e300) shows as the
    # nearest one a date can show.
    seconds = min(max(seconds, 0.0), MAX_TIME)
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat().replace("+00:00", "Z")


class BillingAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @property
    def _accounting(self) -> Accounting:
        assert self._gateway.accounting is not None
        return self._gateway.accounting

    async def _caller(self, request: Request, endpoint: str) -> tuple[Principal, Account]:
        record = await self._gateway.begin(request, endpoint)
        principal = record.principal
        if principal.account_id is None:
            raise InvalidRequestError(
                "This key has no account, so it has no balance or usage.", code="no_account"
            )
        account = await self._accounting.storage.account(principal.account_id)
        if account is None:
            raise NotFoundError("The account of this key no longer exists.")
        return principal, account

    async def subscription(self, request: Request) -> Response:
        _, account = await self._caller(request, "billing")
        limit = usd(account.budget)
        return JSONResponse(
            {
                "object": "billing_subscription",
                "has_payment_method": True,
                "soft_limit_usd": limit,
                "hard_limit_usd": limit,
                "system_hard_limit_usd": limit,
                "access_until": int(account.expires_at or 0),
            }
        )

    async def usage(self, request: Request) -> Response:
        principal, account = await self._caller(request, "billing")
        end = parse_date(request, "end_date") or float(int(time.time() // _DAY + 1) * _DAY)
        start = parse_date(request, "start_date") or end - 100 * _DAY
        if start >= end:
            raise InvalidRequestError("'start_date' must be before 'end_date'.", param="start_date")
        await self._accounting.writer.flush()
        days = await self._accounting.storage.overview(
            LedgerQuery(account_id=account.id, start=start, end=end), "day"
        )
        return JSONResponse(
            {
                "object": "list",
                "total_usage": sum(g.amount for g in days) / _NANOS_PER_CENT,
                "daily_costs": [
                    {
                        "timestamp": calendar.timegm(dt.date.fromisoformat(g.key).timetuple()),
                        "line_items": [{"name": "All models", "cost": g.amount / _NANOS_PER_CENT}],
                    }
                    for g in days
                    if g.key
                ],
            }
        )

    async def key(self, request: Request) -> Response:
        principal, account = await self._caller(request, "billing")
        key = await self._accounting.storage.key(principal.key_id) if principal.key_id else None
        spent = key.spent if key else account.spent
        limit = principal.spend_limit
        # Leased is not spent: a lease idle in some process still belongs to the caller.
        remaining = max(0, account.budget - account.spent)
        if limit is not None:
            remaining = min(remaining, max(0, limit - spent))
        limits = self._gateway.rate_limiter.summary(principal)
        return JSONResponse(
            {
                "data": {
                    "label": principal.key_hint,
                    "name": key.name if key else None,
                    "usage": usd(spent),
                    "limit": usd(limit) if limit is not None else None,
                    "limit_remaining": usd(remaining),
                    "is_free_tier": False,
                    "account_id": account.id,
                    "rate_limit": {
                        "requests": limits["rpm"] if limits["rpm"] is not None else -1,
                        "interval": "1m",
                        "tokens": limits["tpm"],
                        "requests_per_day": limits["rpd"],
                    },
                    "expires_at": iso(key.expires_at) if key and key.expires_at else None,
                }
            }
        )

    async def credits(self, request: Request) -> Response:
        _, account = await self._caller(request, "billing")
        return JSONResponse(
            {"data": {"total_credits": usd(account.credits), "total_usage": usd(account.spent)}}
        )

    async def generation(self, request: Request) -> Response:
        principal, account = await self._caller(request, "billing")
        request_id = request.query_params.get("id")
        if not request_id:
            raise InvalidRequestError("Missing required parameter: 'id'.", param="id")
        storage = self._accounting.storage
        row = None
        if "\x00" not in request_id:  # no id has one, and PostgreSQL refuses to compare it
            row = await storage.by_request(request_id, account.id)
            if row is None:
                await self._accounting.writer.flush()  # it may still be queued
                row = await storage.by_request(request_id, account.id)
        if row is None or row.kind != "request":
            raise NotFoundError(f"No generation '{request_id}' for this account.", param="id")
        return JSONResponse({"data": generation_view(row)})


def generation_view(row: LedgerRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "total_cost": usd(row.amount),
        "created_at": iso(row.created),
        "model": row.model_id or row.model,
        "model_requested": row.model,
        "provider_name": row.provider,
        "upstream_model": row.upstream_model,
        "app": row.app,
        "route": row.route,
        "route_request_id": row.parent_id,
        "streamed": row.stream,
        "cancelled": row.status == 499,
        "status": row.status,
        "error_code": row.error_code,
        "latency": row.latency_ms,
        "time_to_first_token": row.ttft_ms,
        "tokens_prompt": row.prompt_tokens,
        "tokens_completion": row.completion_tokens,
        "native_tokens_cached": row.cached_tokens,
        "native_tokens_reasoning": row.reasoning_tokens,
        "usage_estimated": row.estimated,
        "attempts": row.attempts,
        "key": row.key_prefix,
        "account_id": row.source_account_id,
    }


def billing_routes(billing: BillingAPI) -> list[Route]:
    return [
        Route("/dashboard/billing/subscription", named(billing.subscription), methods=["GET"]),
        Route("/dashboard/billing/usage", named(billing.usage), methods=["GET"]),
        Route("/key", named(billing.key), methods=["GET"]),
        Route("/credits", named(billing.credits), methods=["GET"]),
        Route("/generation", named(billing.generation), methods=["GET"]),
    ]
