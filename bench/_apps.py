"""The servers bench/throughput.py starts, each under its own uvicorn process.

`upstream`: the fake OpenAI upstream. `httpx_floor` / `aiohttp_floor`: the least a
Starlette pass-through can do (forward the bytes, relay the answer). `gateway`: the
demo host app with the gateway mounted at /v1. Upstream URL from BENCH_UPSTREAM.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gate_middleware import RequestRecord
from gate_middleware.testing import FakeUpstream, Fault

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100/v1")

# bench/chaos.py: the overload a vendor shows on a bad day, struck at random.
CHAOS_FAULTS = [
    Fault(status=429, retry_after=1),
    Fault(status=503),
    Fault(drop="before"),
    Fault(drop="mid", after_chunks=3),
]

upstream = FakeUpstream(
    fault_rate=float(os.environ.get("BENCH_FAULT_RATE", "0")),
    random_faults=CHAOS_FAULTS,
    seed=int(os.environ.get("BENCH_SEED", "1")),
    chunk_latency=float(os.environ.get("BENCH_CHUNK_LATENCY", "0")),
)


def _httpx_floor() -> Starlette:
    client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            yield

    async def chat(request: Request) -> Response:
        assert client is not None
        body = await request.body()
        upstream_request = client.build_request(
            "POST",
            UPSTREAM + "/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        response = await client.send(upstream_request, stream=True)
        if b'"stream":true' in body.replace(b" ", b""):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            return StreamingResponse(relay(), media_type="text/event-stream")
        content = await response.aread()
        await response.aclose()
        return Response(content, response.status_code, media_type="application/json")

    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan
    )


def _aiohttp_floor() -> Starlette:
    session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:
            yield

    async def chat(request: Request) -> Response:
        assert session is not None
        body = await request.body()
        response = await session.post(
            UPSTREAM + "/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        if b'"stream":true' in body.replace(b" ", b""):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.content.iter_any():
                        yield chunk
                finally:
                    response.release()

            return StreamingResponse(relay(), media_type="text/event-stream")
        content = await response.read()
        response.release()
        return Response(content, response.status, media_type="application/json")

    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan
    )


def gateway() -> Starlette:
    from gate_middleware.demo import create_app

    # As `gate-middleware serve` runs it.
    return create_app(tune=True)


class _SixHeaders:
    """A guard that only writes the six x-ratelimit-* headers a limited answer carries,
    with the values limits would write: what those headers cost on their own."""

    async def admit(self, record: RequestRecord) -> None:
        record.headers.update(
            {
                "x-ratelimit-limit-requests": "10000000",
                "x-ratelimit-remaining-requests": "9999987",
                "x-ratelimit-reset-requests": "41.503s",
                "x-ratelimit-limit-tokens": "1000000000",
                "x-ratelimit-remaining-tokens": "999957620",
                "x-ratelimit-reset-tokens": "41.503s",
            }
        )

    async def settle(self, record: RequestRecord) -> None:
        pass


def gateway_six_headers() -> Starlette:
    """`gateway`, limits off, answering with limits' six headers all the same."""
    app = gateway()
    app.state.gateway.guards.append(_SixHeaders())
    return app


httpx_floor = _httpx_floor()
aiohttp_floor = _aiohttp_floor()


def _host(guarded: bool) -> Starlette:
    """A host app with a trivial route `/plain`; with `guarded`, GateMiddleware guards
    `/ai/*` (and `/ai/ping`, a trivial route behind it, shows the guard's own cost)."""
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse

    from gate_middleware import GateMiddleware, Gateway

    gateway = Gateway()

    async def plain(request: Request) -> Response:
        return JSONResponse({"ok": True})

    middleware = [Middleware(GateMiddleware, gateway=gateway, paths=["/ai/*"])] if guarded else []
    return Starlette(
        routes=[Route("/plain", plain), Route("/ai/ping", plain)],
        middleware=middleware,
        lifespan=gateway.lifespan,
    )


def host_plain() -> Starlette:
    return _host(guarded=False)


def host_guarded() -> Starlette:
    return _host(guarded=True)
