"""The gateway's outermost layer: it names each request, refuses work before start-up,
and has routes render every error OpenAI-shaped."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import (
    REQUEST_ID,
    GateError,
    GatewayNotStartedError,
    error_response,
    handle_gate_error,
    handle_unexpected,
)
from .record import request_id_for

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["CORS", "RequestContext", "handle_http_exception", "named"]

logger = logging.getLogger("gate_middleware")


async def handle_http_exception(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, HTTPException)
    error = GateError(exc.detail, status=exc.status_code, type="invalid_request_error")
    error.headers.update(exc.headers or {})
    return error_response(error, request.scope.get(REQUEST_ID))


_HANDLERS: tuple[dict[Any, Any], dict[int, Any]] = (
    {
        GateError: handle_gate_error,
        HTTPException: handle_http_exception,
        Exception: handle_unexpected,
    },
    {},
)


class RequestContext:
    """Names the request (`x-request-id`, echoed by every response), refuses work before
    start-up, and has routes render every error OpenAI-shaped.

    It does not wrap `send`: each response sets the header itself (the model endpoints
    on their own, the other routes through `named`), which spares every streamed chunk
    one more layer.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        scope[REQUEST_ID] = request_id
        scope["starlette.exception_handlers"] = _HANDLERS
        if not self.gateway.started:
            logger.error("A request reached the gateway before its lifespan started it.")
            error = GatewayNotStartedError(
                "The gateway was not started. Mounted apps get no lifespan events: start it "
                "with FastAPI(lifespan=gateway.lifespan), or 'async with gateway:' inside "
                "the host's own lifespan.",
                headers={"x-should-retry": "false"},
            )
            await error_response(error, request_id)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except HTTPException as exc:  # raised by routing itself, e.g. 405
            request = Request(scope)
            await (await handle_http_exception(request, exc))(scope, receive, send)


Handler = Callable[[Request], Awaitable[Response]]


def named(endpoint: Handler) -> Handler:
    """The route function, its answer carrying the request's `x-request-id`."""

    @functools.wraps(endpoint)
    async def answer(request: Request) -> Response:
        response = await endpoint(request)
        response.headers["x-request-id"] = request.scope[REQUEST_ID]
        return response

    return answer


class CORS(CORSMiddleware):
    """Starlette's, whose preflight answers (made here: they reach no route) carry an
    `x-request-id` as every other answer does."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                response = self.preflight_response(request_headers=headers)
                response.headers["x-request-id"] = request_id_for(scope)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
