"""`GET /ratelimits`: a key's limits and what remains of each (tools show their users RPM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["RateLimitsAPI"]


class RateLimitsAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def get(self, request: Request) -> JSONResponse:
        gateway = self._gateway
        record = await gateway.begin(request, "ratelimits")
        snapshot = await gateway.rate_limiter.snapshot(record.principal)
        return JSONResponse(snapshot, headers={"x-request-id": record.request_id})
