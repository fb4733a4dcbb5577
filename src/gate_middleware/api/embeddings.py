"""`POST /embeddings`."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import GateError, InvalidRequestError
from ..providers.base import Reply
from ..record import usage_into
from ..retry import Candidate
from ._endpoint import Endpoint, answer

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["EmbeddingsAPI"]


class EmbeddingsAPI(Endpoint):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def handle(self, request: Request) -> Response:
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
            await gateway.admit(record, body, entry)
            answered = await gateway.call(request, record, entry, body, _embed)
        except GateError as exc:
            await gateway.finish(record, exc)
            raise
        except BaseException as exc:
            await gateway.abandon(record, exc)
            raise
        data = answered.value.data
        data["model"] = answered.candidate.entry.id
        usage_into(record, data.get("usage"))
        await gateway.finish(record)
        return answer(data, record, answered)


def _embed(candidate: Candidate, body: dict[str, Any]) -> Awaitable[Reply]:
    return candidate.deployment.provider.embeddings(body)
