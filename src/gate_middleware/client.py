"""`GateClient`: model calls from a host route, metered and limited as its caller's."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from ._inprocess import in_process_transport
from .auth import PARENT, PRINCIPAL, ROUTE, Principal
from .errors import GateError, UpstreamError
from .sse import iter_sse_data

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["GateClient", "as_gate_error"]

_BASE = "http://gateway.internal"


class GateClient:
    """Calls the gateway in-process as the caller: no key is sent, nothing leaves the
    process, and every call gets its ledger row with the host route on it.

    `chat(...)` and `embeddings(...)` take OpenAI's request fields as keywords and return
    OpenAI's JSON (a stream: an async iterator of chunks). `openai()` gives an
    `AsyncOpenAI` client for code that already uses the SDK.
    """

    def __init__(self, gateway: Gateway, principal: Principal, route: str, parent_id: str) -> None:
        self._gateway = gateway
        self._scope = {PRINCIPAL: principal, ROUTE: route, PARENT: parent_id}
        self._http: httpx.AsyncClient | None = None
        self._sdk: Any = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = in_process_transport(httpx, self._gateway, self._scope)
            self._http = httpx.AsyncClient(transport=transport, base_url=_BASE, timeout=None)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._sdk is not None:
            await self._sdk.close()

    async def chat(self, **body: Any) -> Any:
        """A chat completion; with `stream=True`, an async iterator of chunks."""
        if body.get("stream"):
            # Opened here, so a refusal (402, 429...) raises now, before the handler
            # starts its own response; the iterator then only relays chunks.
            client = self._client()
            request = client.build_request("POST", "/chat/completions", json=body)
            response = await client.send(request, stream=True)
            if response.status_code != 200:
                raw = await response.aread()
                await response.aclose()
                raise _error_from(response.status_code, raw, response.headers)
            return _chunks(response)
        return await self._post("/chat/completions", body)

    async def embeddings(self, **body: Any) -> Any:
        return await self._post("/embeddings", body)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = await self._client().post(path, json=body)
        if response.status_code != 200:
            raise _error_from(response.status_code, response.content, response.headers)
        return response.json()

    def openai(self) -> Any:
        """An `openai.AsyncOpenAI` bound to this caller (needs the `openai` package)."""
        if self._sdk is None:
            try:
                import openai
            except ImportError:
                raise RuntimeError("GateClient.openai() needs the openai package.") from None
            # openai-python 3.x is built on httpx2, 1.x and 2.x on httpx: use its own.
            base = openai.DefaultAsyncHttpxClient.__mro__[1]
            http = sys.modules[inspect.getmodule(base).__name__.split(".")[0]]  # type: ignore[union-attr]
            transport = in_process_transport(http, self._gateway, self._scope)
            self._sdk = openai.AsyncOpenAI(
                base_url=_BASE,
                api_key="in-process",
                max_retries=0,  # the gateway retries already
                http_client=http.AsyncClient(transport=transport, timeout=None),
            )
        return self._sdk


async def _chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    try:
        async for batch in iter_sse_data(response.aiter_raw()):
            for data in batch:
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _error_from(502, data, {})
                yield chunk
    finally:
        await response.aclose()


def as_gate_error(exc: BaseException) -> GateError | None:
    """A refusal a handler let through: ours, or the openai SDK's (`gate.openai()`)."""
    if isinstance(exc, GateError):
        return exc
    status, response = getattr(exc, "status_code", None), getattr(exc, "response", None)
    if isinstance(status, int) and response is not None and hasattr(response, "content"):
        return _error_from(status, response.content, response.headers)
    return None


def _error_from(status: int, raw: bytes, headers: Any) -> GateError:
    try:
        error = json.loads(raw)["error"]
        message, kind = str(error["message"]), error.get("type")
        code, param = error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, kind, code, param = raw.decode(errors="replace")[:500], None, None, None
    exc = (
        UpstreamError(message, status=status, type=kind, code=code, param=param)
        if status >= 500 or status in (408, 409)
        else GateError(message, status=status, type=kind, code=code, param=param)
    )
    if retry_after := headers.get("retry-after"):
        exc.headers["retry-after"] = retry_after
    return exc
