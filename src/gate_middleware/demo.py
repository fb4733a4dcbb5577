"""The standalone host app `gate-middleware serve` runs: the gateway mounted at `/v1`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from ._tuning import tune_gc
from .app import Gateway
from .auth import Principal
from .errors import NotFoundError, error_response
from .settings import GateSettings

__all__ = ["create_app"]

_DEMO_CREDIT_USD = "5"


async def _demo_key(gateway: Gateway) -> str:
    """A key of the "demo" account (made, with some credit, on the first run)."""
    assert gateway.accounting is not None
    accounts, storage = gateway.accounting.accounts, gateway.accounting.storage
    admin = Principal(id="admin", key_hint="admin", admin=True)
    demo = next((a for a in await storage.children(None) if a.name == "demo"), None)
    if demo is None:
        demo = await accounts.create_account(admin, {"name": "demo"})
        await accounts.credit(
            admin, demo.id, {"amount_usd": _DEMO_CREDIT_USD, "note": "demo credit"}, kind="topup"
        )
    _, secret = await accounts.create_key(admin, demo.id, {"name": "demo run"})
    return secret


def create_app(
    settings: GateSettings | None = None, *, demo_account: bool = False, tune: bool = False
) -> Starlette:
    """The host app; `demo_account` makes a key of a "demo" account at start and prints it;
    `tune` calls `tune_gc()` once started, as `serve` does (a process of its own)."""
    gateway = Gateway(settings)

    async def index(request: Request) -> JSONResponse:
        base = str(request.base_url).rstrip("/") + "/v1"
        return JSONResponse(
            {
                "service": "gate-middleware",
                "base_url": base,
                "models": f"{base}/models",
                "providers": sorted(gateway.providers),
            }
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        # A client whose base URL lacks /v1 lands here: say where the gateway is.
        base = str(request.base_url).rstrip("/") + "/v1"
        error = NotFoundError(
            f"Unknown path '{request.url.path}'. The gateway is at {base}: "
            "use that as the client's base URL.",
            code="unknown_url",
        )
        return error_response(error)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok" if gateway.started else "starting"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway:
            if demo_account:
                key = await _demo_key(gateway)
                print(f"gate-middleware: API key for this run: {key}", flush=True)
            if tune:
                tune_gc()
            yield

    app = Starlette(
        routes=[
            # First: routes are tried in order, and nearly every request is the API's.
            Mount("/v1", gateway),
            Route("/", index),
            Route("/healthz", health),
            # Some tools call the billing routes without /v1.
            *gateway.root_routes(),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found},
    )
    app.state.gateway = gateway
    return app
