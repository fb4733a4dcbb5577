"""`Endpoint`: a route that is its own ASGI app, for the endpoints every call goes through."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .._context import handle_http_exception
from ..errors import REQUEST_ID, GateError, error_response, handle_unexpected

__all__ = ["Endpoint"]


class Endpoint:
    """Starlette's `request_response` wraps a route function in two coroutines more and
    every `send` in one closure more. The model endpoints answer on their own instead,
    and render their errors OpenAI-shaped as the other routes' handlers do."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.handle(request)
        except GateError as exc:
            response = error_response(exc, scope.get(REQUEST_ID))
        except HTTPException as exc:
            response = await handle_http_exception(request, exc)
        except Exception as exc:
            response = await handle_unexpected(request, exc)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> ASGIApp:
        raise NotImplementedError
