"""An httpx (or httpx2) transport that calls an ASGI app in-process, streaming.

httpx's own ASGITransport collects the whole body before returning, so a stream would
arrive all at once; this one hands each `http.response.body` message on as it is sent.
It also adds trusted keys to the scope (the caller already authenticated, the host
route), which no request from outside can set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message

__all__ = ["in_process_transport"]

_cache: dict[str, type] = {}


def in_process_transport(module: ModuleType, app: ASGIApp, scope: Mapping[str, Any]) -> Any:
    """A transport for `module` (httpx or httpx2) that sends requests to `app`."""
    cls = _cache.get(module.__name__)
    if cls is None:
        cls = _cache[module.__name__] = _make_transport(module)
    return cls(app, scope)


def _make_transport(http: ModuleType) -> type:
    class _Body(http.AsyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(
            self, chunks: asyncio.Queue[Any], task: asyncio.Task[None], gone: asyncio.Event
        ) -> None:
            self._chunks, self._task, self._gone = chunks, task, gone

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while (chunk := await self._chunks.get()) is not None:
                if isinstance(chunk, BaseException):
                    raise http.ReadError(f"the in-process app failed: {chunk!r}") from chunk
                yield chunk

        async def aclose(self) -> None:
            self._gone.set()  # the app sees http.disconnect, as from a client hanging up
            if not self._task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(self._task), timeout=5)

    class _Transport(http.AsyncBaseTransport):  # type: ignore[name-defined,misc]
        def __init__(self, app: ASGIApp, extra: Mapping[str, Any]) -> None:
            self._app, self._extra = app, dict(extra)

        async def handle_async_request(self, request: Any) -> Any:
            body = await request.aread()
            url = request.url
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": request.method,
                "scheme": url.scheme,
                "path": unquote(url.path),
                "raw_path": url.raw_path.split(b"?")[0],
                "query_string": url.query,
                "root_path": "",
                "headers": [(k.lower(), v) for k, v in request.headers.raw],
                "server": (url.host, url.port or 80),
                "client": ("127.0.0.1", 0),
                **self._extra,
            }
            chunks: asyncio.Queue[Any] = asyncio.Queue()
            started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            gone = asyncio.Event()
            sent_body = False

            async def receive() -> Message:
                nonlocal sent_body
                if not sent_body:
                    sent_body = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    started.set_result(message)
                elif message["type"] == "http.response.body":
                    if chunk := message.get("body", b""):
                        await chunks.put(chunk)
                    if not message.get("more_body", False):
                        await chunks.put(None)

            async def run() -> None:
                try:
                    await self._app(scope, receive, send)
                except BaseException as exc:
                    if not started.done():
                        started.set_exception(exc)
                    else:
                        await chunks.put(exc)
                    if not isinstance(exc, Exception):
                        raise

            task = asyncio.get_running_loop().create_task(run())
            start = await started
            return http.Response(
                start["status"],
                headers=start.get("headers", []),
                stream=_Body(chunks, task, gone),
                request=request,
            )

    return _Transport
