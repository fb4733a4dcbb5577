"""A Starlette app that mounts the gateway at /v1 next to its own routes.

Run: GATE_API_KEYS=sk-my-key uvicorn examples.starlette_app:app
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from gate_middleware import Gateway

gateway = Gateway()


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("My product's home page.")


app = Starlette(
    routes=[Route("/", home), Mount("/v1", gateway)],
    lifespan=gateway.lifespan,
)
