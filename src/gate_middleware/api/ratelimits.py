"""`GET /ratelimits`: a key's limits and what remains of each (tools show their users RPM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..auth import authenticate

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["RateLimitsAPI"]


class RateLimitsAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def get(self, request: Request) -> JSONResponse:
        gateway = self._gateway
        principal = await authenticate(gateway.authenticator, request.headers)
        return JSONResponse(await gateway.rate_limiter.snapshot(principal))
