"""`GET /models` and `GET /models/{id}`: OpenAI's list shape, plus owner, context and prices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["ModelsAPI"]


class ModelsAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def list(self, request: Request) -> Response:
        record = await self._gateway.begin(request, "models")
        cards = [entry.card() for entry in self._gateway.catalogue.entries()]
        return JSONResponse(
            {"object": "list", "data": cards}, headers={"x-request-id": record.request_id}
        )

    async def retrieve(self, request: Request) -> Response:
        record = await self._gateway.begin(request, "models")
        entry = self._gateway.catalogue.resolve(request.path_params["model_id"])
        return JSONResponse(entry.card(), headers={"x-request-id": record.request_id})
