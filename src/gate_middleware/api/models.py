"""`GET /models` and `GET /models/{id}`: OpenAI's list shape, plus owner, context and prices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..accounts import model_allowed
from ..errors import PermissionDeniedError

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["ModelsAPI"]


class ModelsAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def list(self, request: Request) -> Response:
        """The models this key may use (a key with `allowed_models` sees those only)."""
        record = await self._gateway.begin(request, "models")
        principal = record.principal
        cards = [
            entry.card()
            for entry in self._gateway.catalogue.entries()
            if model_allowed(principal, entry.id)
        ]
        return JSONResponse(
            {"object": "list", "data": cards}, headers={"x-request-id": record.request_id}
        )

    async def retrieve(self, request: Request) -> Response:
        record = await self._gateway.begin(request, "models")
        name = request.path_params["model_id"]
        entry = self._gateway.catalogue.resolve(name)
        if not model_allowed(record.principal, entry.id, name):
            raise PermissionDeniedError(
                f"This key may not use the model '{name}'.", param="model", code="model_not_allowed"
            )
        return JSONResponse(entry.card(), headers={"x-request-id": record.request_id})
