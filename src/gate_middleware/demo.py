"""The standalone host app `gate-middleware serve` runs: the gateway mounted at `/v1`."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from .app import Gateway
from .settings import GateSettings

__all__ = ["create_app"]


def create_app(settings: GateSettings | None = None) -> Starlette:
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

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok" if gateway.started else "starting"})

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", health),
            # Some tools call the billing routes without /v1.
            *gateway.root_routes(),
            Mount("/v1", gateway),
        ],
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
