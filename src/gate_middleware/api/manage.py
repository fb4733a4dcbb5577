"""The management API (accounts, keys, top-ups) and cost analysis (overview, ledger, CSV).

Every call acts for the caller: the admin key for everything, an account's key for
its own account (read) and its descendants (read and write). Schema: `GET /openapi.json`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .._context import named
from ..errors import InvalidRequestError
from ..pricing import usd
from ..storage import Account, ApiKey, LedgerQuery, LedgerRow
from ..storage._common import GROUPS, MAX_BIGINT
from ._openapi import openapi_schema
from .billing import iso, parse_date

if TYPE_CHECKING:
    from ..accounting import Accounting
    from ..app import Gateway
    from ..auth import Principal

__all__ = ["ManageAPI", "account_view", "key_view", "manage_routes", "row_view"]

_MAX_PAGE = 1000
_CSV_COLUMNS = (
    "seq", "id", "created", "kind", "account_id", "source_account_id", "key_prefix", "model",
    "model_id", "provider", "upstream_model", "prompt_tokens", "completion_tokens",
    "cached_tokens", "reasoning_tokens", "amount_usd", "latency_ms", "ttft_ms", "status",
    "error_code", "attempts", "app", "route", "parent_id", "stream", "estimated", "actor",
    "note",
)  # fmt: skip


def account_view(account: Account) -> dict[str, Any]:
    return {
        "id": account.id,
        "object": "account",
        "name": account.name,
        "parent_id": account.parent_id,
        "enabled": account.enabled,
        "expires_at": account.expires_at,
        "multiplier": str(account.multiplier),
        "allowed_models": list(account.allowed_models) if account.allowed_models else None,
        "rpm": account.rpm,
        "tpm": account.tpm,
        "rpd": account.rpd,
        "max_concurrency": account.max_concurrency,
        "spend_limit_usd": usd(account.spend_limit) if account.spend_limit is not None else None,
        "credits_usd": usd(account.credits),
        "spent_usd": usd(account.spent),
        "held_usd": usd(account.leased),
        "balance_usd": usd(account.available),
        "created_at": iso(account.created_at),
    }


def key_view(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "api_key",
        "account_id": key.account_id,
        "name": key.name,
        "prefix": key.prefix,
        "enabled": key.enabled,
        "expires_at": key.expires_at,
        "multiplier": str(key.multiplier),
        "allowed_models": list(key.allowed_models) if key.allowed_models else None,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "rpd": key.rpd,
        "max_concurrency": key.max_concurrency,
        "spend_limit_usd": usd(key.spend_limit) if key.spend_limit is not None else None,
        "spent_usd": usd(key.spent),
        "created_at": iso(key.created_at),
    }


def row_view(row: LedgerRow) -> dict[str, Any]:
    view: dict[str, Any] = {
        name: getattr(row, name)
        for name in _CSV_COLUMNS
        if name not in ("amount_usd", "created") and hasattr(row, name)
    }
    view["created"] = iso(row.created)
    view["amount_usd"] = usd(row.amount)
    view["amount_nanos"] = row.amount
    return view


def _whole(text: str | None, most: int, name: str, what: str) -> int | None:
    """A whole number from 0 to `most` in a query parameter, or None when it is absent.
    ASCII digits only: `"²".isdigit()` is true, and `int("²")` fails."""
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= most):
        raise InvalidRequestError(f"'{name}' must be {what}.", param=name)
    return int(text)


class ManageAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @property
    def _accounting(self) -> Accounting:
        assert self._gateway.accounting is not None
        return self._gateway.accounting

    async def _actor(self, request: Request) -> Principal:
        return (await self._gateway.begin(request, "manage")).principal

    async def _body(self, request: Request) -> dict[str, Any]:
        return await self._gateway.read_json(request)

    # Accounts ----------------------------------------------------------------------

    async def list_accounts(self, request: Request) -> Response:
        actor = await self._actor(request)
        accounts = self._accounting.accounts
        parent = request.query_params.get("parent_id")
        if parent is None and not actor.admin:
            parent = accounts.home(actor)
        if parent is not None:
            await accounts.get(actor, parent)
        children = await self._accounting.storage.children(parent)
        return JSONResponse({"object": "list", "data": [account_view(a) for a in children]})

    async def create_account(self, request: Request) -> Response:
        actor = await self._actor(request)
        account = await self._accounting.accounts.create_account(actor, await self._body(request))
        return JSONResponse(account_view(account), status_code=201)

    async def get_account(self, request: Request) -> Response:
        actor = await self._actor(request)
        account = await self._accounting.accounts.get(actor, request.path_params["account_id"])
        return JSONResponse(account_view(account))

    async def update_account(self, request: Request) -> Response:
        actor = await self._actor(request)
        account = await self._accounting.accounts.update_account(
            actor, request.path_params["account_id"], await self._body(request)
        )
        return JSONResponse(account_view(account))

    async def credit(self, request: Request) -> Response:
        actor = await self._actor(request)
        kind = "topup" if request.url.path.endswith("/topups") else "adjustment"
        account = await self._accounting.accounts.credit(
            actor, request.path_params["account_id"], await self._body(request), kind=kind
        )
        return JSONResponse(account_view(account), status_code=201)

    # Keys ----------------------------------------------------------------------------

    async def list_keys(self, request: Request) -> Response:
        actor = await self._actor(request)
        account = await self._accounting.accounts.get(actor, request.path_params["account_id"])
        keys = await self._accounting.storage.keys(account.id)
        return JSONResponse({"object": "list", "data": [key_view(k) for k in keys]})

    async def create_key(self, request: Request) -> Response:
        actor = await self._actor(request)
        key, secret = await self._accounting.accounts.create_key(
            actor, request.path_params["account_id"], await self._body(request)
        )
        # The only time the whole key is ever shown.
        return JSONResponse({**key_view(key), "key": secret}, status_code=201)

    async def get_key(self, request: Request) -> Response:
        actor = await self._actor(request)
        key = await self._accounting.accounts.key(actor, request.path_params["key_id"])
        return JSONResponse(key_view(key))

    async def update_key(self, request: Request) -> Response:
        actor = await self._actor(request)
        key = await self._accounting.accounts.update_key(
            actor, request.path_params["key_id"], await self._body(request)
        )
        return JSONResponse(key_view(key))

    async def disable_key(self, request: Request) -> Response:
        actor = await self._actor(request)
        key = await self._accounting.accounts.update_key(
            actor, request.path_params["key_id"], {"enabled": False}
        )
        return JSONResponse(key_view(key))

    # Cost analysis -------------------------------------------------------------------

    async def _query(self, request: Request, actor: Principal) -> LedgerQuery:
        params = request.query_params
        accounts = self._accounting.accounts
        account_id = params.get("account_id") or accounts.home(actor)
        await accounts.get(actor, account_id)
        status = _whole(params.get("status"), 999, "status", "an HTTP status code")
        limit = _whole(params.get("limit", "100"), _MAX_PAGE, "limit", f"1 to {_MAX_PAGE}")
        cursor = _whole(params.get("cursor"), MAX_BIGINT, "cursor", "one this API gave")
        if not limit:
            raise InvalidRequestError(f"'limit' must be 1 to {_MAX_PAGE}.", param="limit")
        for name in ("model", "key_id", "source_account_id"):
            if "\x00" in params.get(name, ""):  # PostgreSQL cannot even compare one
                raise InvalidRequestError(f"'{name}' has a NUL character.", param=name)
        kind = params.get("kind")
        if kind is not None and kind not in ("request", "topup", "adjustment"):
            raise InvalidRequestError("'kind' must be request, topup or adjustment.", param="kind")
        await self._accounting.writer.flush()
        return LedgerQuery(
            account_id=account_id,
            start=parse_date(request, "start_date"),
            end=parse_date(request, "end_date"),
            model=params.get("model"),
            key_id=params.get("key_id"),
            source_account_id=params.get("source_account_id"),
            status=status,
            kind=kind,
            before=cursor,
            limit=limit,
        )

    async def overview(self, request: Request) -> Response:
        actor = await self._actor(request)
        group_by = request.query_params.get("group_by", "day")
        if group_by not in GROUPS:
            raise InvalidRequestError(
                f"'group_by' must be one of: {', '.join(GROUPS)}.", param="group_by"
            )
        query = await self._query(request, actor)
        groups = await self._accounting.storage.overview(query, group_by)
        fields = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens",
                  "reasoning_tokens", "errors")  # fmt: skip

        def view(key: str | None, values: dict[str, int], amount: int) -> dict[str, Any]:
            return {"key": key, **values, "cost_usd": usd(amount), "cost_nanos": amount}

        totals = {name: sum(getattr(g, name) for g in groups) for name in fields}
        return JSONResponse(
            {
                "object": "usage_overview",
                "account_id": query.account_id,
                "group_by": group_by,
                "start_date": iso(query.start) if query.start is not None else None,
                "end_date": iso(query.end) if query.end is not None else None,
                "groups": [
                    view(g.key, {n: getattr(g, n) for n in fields}, g.amount) for g in groups
                ],
                "totals": view(None, totals, sum(g.amount for g in groups)),
            }
        )

    async def ledger(self, request: Request) -> Response:
        actor = await self._actor(request)
        query = await self._query(request, actor)
        rows = await self._accounting.storage.rows(query)
        more = len(rows) == query.limit
        return JSONResponse(
            {
                "object": "list",
                "data": [row_view(r) for r in rows],
                "has_more": more,
                "next_cursor": str(rows[-1].seq) if more and rows else None,
            }
        )

    async def ledger_csv(self, request: Request) -> Response:
        actor = await self._actor(request)
        query = await self._query(request, actor)
        query.limit = _MAX_PAGE
        storage = self._accounting.storage
        # The first page before the answer starts: a failure is still an error answer.
        first = await storage.rows(query)

        async def lines() -> AsyncIterator[str]:
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(_CSV_COLUMNS)
            rows = first
            while True:
                for row in rows:
                    view = row_view(row)
                    writer.writerow(_cell(view[name]) for name in _CSV_COLUMNS)
                yield out.getvalue()
                out.seek(0)
                out.truncate()
                if len(rows) < query.limit:
                    return
                query.before = rows[-1].seq
                rows = await storage.rows(query)

        return StreamingResponse(
            lines(),
            media_type="text/csv",
            headers={
                "content-disposition": f'attachment; filename="ledger-{query.account_id}.csv"'
            },
        )

    async def openapi(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return JSONResponse(openapi_schema(root))


def manage_routes(manage: ManageAPI) -> list[Route]:
    return [
        Route("/accounts", named(manage.list_accounts), methods=["GET"]),
        Route("/accounts", named(manage.create_account), methods=["POST"]),
        Route("/accounts/{account_id}", named(manage.get_account), methods=["GET"]),
        Route("/accounts/{account_id}", named(manage.update_account), methods=["PATCH"]),
        Route("/accounts/{account_id}/topups", named(manage.credit), methods=["POST"]),
        Route("/accounts/{account_id}/adjustments", named(manage.credit), methods=["POST"]),
        Route("/accounts/{account_id}/keys", named(manage.list_keys), methods=["GET"]),
        Route("/accounts/{account_id}/keys", named(manage.create_key), methods=["POST"]),
        Route("/keys/{key_id}", named(manage.get_key), methods=["GET"]),
        Route("/keys/{key_id}", named(manage.update_key), methods=["PATCH"]),
        Route("/keys/{key_id}", named(manage.disable_key), methods=["DELETE"]),
        Route("/usage", named(manage.overview), methods=["GET"]),
        Route("/ledger", named(manage.ledger), methods=["GET"]),
        Route("/ledger.csv", named(manage.ledger_csv), methods=["GET"]),
        Route("/openapi.json", named(manage.openapi), methods=["GET"]),
    ]


def _cell(value: Any) -> Any:
    """Text a spreadsheet would run as a formula (a caller's own X-Title or request id:
    "=HYPERLINK(...)") starts with a quote, which shows it as text (OWASP's advice)."""
    if isinstance(value, str) and value[:1] in _FORMULA_STARTS:
        return "'" + value
    return value


_FORMULA_STARTS = frozenset("=+-@\t\r")
