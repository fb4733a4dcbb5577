"""`OpenAICompatible`: OpenAI, DeepSeek, OpenRouter, Groq, vLLM, Ollama and the rest."""

from __future__ import annotations

import contextlib
import email.utils
import math
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

import httpx

from .. import _json
from ..errors import UpstreamError
from ..sse import iter_sse_data
from ._transport import (
    AiohttpTransport,
    HttpxTransport,
    Transport,
    TransportResponse,
    shown,
)
from .base import Reply

__all__ = ["OpenAICompatible", "upstream_error"]

_MAX_WAIT = 86_400.0  # seconds: a longer retry-after is read as a day


class OpenAICompatible:
    """A provider over one pooled, keep-alive connection pool per upstream."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        stream_timeout: float = 120.0,
        stream_usage: bool = True,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"content-type": "application/json", **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        # Never relayed to a caller, should the upstream quote it in an error.
        self._secret = api_key.encode() if api_key else None
        self._read_timeout = read_timeout
        self._stream_timeout = stream_timeout
        self._stream_usage = stream_usage
        self._chat_url = f"{self.base_url}/chat/completions"
        self._transport: Transport = (
            AiohttpTransport(connect_timeout=connect_timeout)
            if client is None
            else HttpxTransport(client, connect_timeout=connect_timeout)
        )

    def __repr__(self) -> str:
        return f"OpenAICompatible({shown(self.base_url)!r})"

    async def startup(self) -> None:
        await self._transport.startup()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _call(self, url: str, body: dict[str, Any]) -> Reply:
        response = await self._transport.send(
            "POST", url, self._headers, _json.dumps(body), read_timeout=self._read_timeout
        )
        return await _whole(response, self._secret)

    # Plain functions returning the coroutine: one await level less on every suspension.
    def chat(self, body: dict[str, Any]) -> Coroutine[Any, Any, Reply]:
        return self._call(self._chat_url, body)

    def embeddings(self, body: dict[str, Any]) -> Coroutine[Any, Any, Reply]:
        return self._call(f"{self.base_url}/embeddings", body)

    async def list_models(self) -> list[dict[str, Any]]:
        response = await self._transport.send(
            "GET", f"{self.base_url}/models", self._headers, None, read_timeout=self._read_timeout
        )
        data = (await _whole(response, self._secret)).data.get("data")
        return data if isinstance(data, list) else []

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        body = {**body, "stream": True}
        if self._stream_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        response = await self._transport.send(
            "POST",
            self._chat_url,
            self._headers,
            _json.dumps(body),
            read_timeout=self._stream_timeout,
        )
        try:
            if response.status != 200:
                raw = await response.read()
                raise upstream_error(response.status, raw, response.headers, self._secret)
            async for batch in iter_sse_data(response.iter_chunks()):
                if batch[-1] == b"[DONE]":
                    if len(batch) > 1:
                        yield batch[:-1]
                    return
                yield batch
            raise UpstreamError(
                "The upstream ended the stream before it was complete.",
                status=502,
                code="upstream_stream_truncated",
            )
        finally:
            await response.aclose()


async def _whole(response: TransportResponse, secret: bytes | None) -> Reply:
    raw = await response.read()
    if response.status != 200:
        raise upstream_error(response.status, raw, response.headers, secret)
    try:
        data = _json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError(
            "The upstream sent a malformed response.", status=502, code="upstream_bad_response"
        )
    return Reply(data)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait an upstream asked for, in seconds, if it asked for one: "inf", "nan" or
    -5 are not waits; a longer one than a day is read as a day."""
    seconds = None
    if value := headers.get("retry-after-ms"):
        with contextlib.suppress(ValueError):
            seconds = float(value) / 1000
    if (seconds is None or not math.isfinite(seconds)) and (value := headers.get("retry-after")):
        try:
            seconds = float(value)
        except ValueError:
            with contextlib.suppress(ValueError, TypeError):  # an HTTP date
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_WAIT)


def upstream_error(
    status: int, raw: bytes, headers: Mapping[str, str], secret: bytes | None = None
) -> UpstreamError:
    """Turn a vendor's error answer (OpenAI, Anthropic, FastAPI-style or text) into ours;
    `secret` (the gateway's own key for that upstream) is masked wherever it is quoted."""
    if secret and secret in raw:
        raw = raw.replace(secret, b"***")
    message, type_, code, param = f"The upstream answered {status}.", None, None, None
    try:
        payload = _json.loads(raw)
    except ValueError:
        payload = None
        if text := raw.decode(errors="replace").strip()[:500]:
            message = text
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or message)
            type_, code, param = error.get("type"), error.get("code"), error.get("param")
        elif isinstance(error, str):
            message = error
    if not 400 <= status <= 599:
        # A 201, a 204, a redirect: no answer, and a status relayed as it is would read
        # as a success to the client (a 204 or 304 cannot even carry the error).
        return UpstreamError(
            f"The upstream answered {status}, which is not an answer.",
            status=502,
            code="upstream_bad_response",
            retryable=False,
        )
    retry_after = _retry_after(headers)
    if status in (401, 403):
        # The vendor refused the gateway's own credentials: not the caller's fault (so
        # not 401), and permanent (so not 5xx, which the SDKs would retry).
        return UpstreamError(
            f"The upstream refused the gateway's credentials: {message}",
            status=403,
            code="upstream_auth_error",
            retryable=False,
        )
    relayed = 503 if 520 <= status <= 529 else status
    return UpstreamError(
        message,
        status=relayed,
        type=str(type_) if type_ else None,
        code=str(code) if code is not None else None,
        param=str(param) if param is not None else None,
        retry_after=retry_after,
        retryable=status in (408, 409, 429) or status >= 500,
    )
