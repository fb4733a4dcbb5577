"""`POST /embeddings`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from ..errors import GateError, InvalidRequestError
from ..record import usage_into

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["EmbeddingsAPI"]


class EmbeddingsAPI:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def create(self, request: Request) -> Response:
        gateway = self._gateway
        record = await gateway.begin(request, "embeddings")
        try:
            body = await gateway.read_json(request)
            record.model = gateway.check_embeddings(body)
            entry = gateway.catalogue.resolve(record.model)
            if entry.kind == "chat":
                raise InvalidRequestError(
                    f"'{entry.id}' is a chat model; it cannot make embeddings.",
                    param="model",
                    code="model_not_supported",
                )
            deployment = entry.pick()
            record.model_id, record.provider = entry.id, deployment.provider_name
            record.upstream_model = deployment.model
            await gateway.admit(record, body)
            reply = await deployment.provider.embeddings({**body, "model": deployment.model})
        except GateError as exc:
            await gateway.finish(record, exc)
            raise
        data = reply.data
        data["model"] = entry.id
        usage_into(record, data.get("usage"))
        await gateway.finish(record)
        return Response(
            json.dumps(data, separators=(",", ":")).encode(),
            media_type="application/json",
            headers={
                **record.headers,
                "x-gate-provider": deployment.provider_name,
                "x-request-id": record.request_id,
            },
        )
