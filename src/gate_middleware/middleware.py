"""`GateMiddleware`: the gateway's keys, limits, quota and metering around host routes.

    app.add_middleware(GateMiddleware, gateway=gateway, paths=["/summarize", "/ai/*"])

For the selected paths it authenticates the caller's gateway key (401 otherwise), runs
the gateway's guards for the route itself (rate limits, quota), and gives the handler
`request.state.gate`: the caller and a `GateClient` whose model calls are metered and
limited as the caller's, with the route on every ledger row. Everything else (other
paths, WebSockets, lifespan, streaming bodies) passes through untouched.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from fnmatch import translate
from typing import TYPE_CHECKING

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Principal, authenticate
from .client import GateClient, as_gate_error
from .errors import GateError, GatewayNotStartedError, InvalidRequestError, error_response
from .record import RequestRecord, app_of, gate_headers, request_id_for

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["GateContext", "GateDependency", "GateMiddleware"]


@dataclass(frozen=True, slots=True)
class GateContext:
    """What a guarded handler gets as `request.state.gate`."""

    principal: Principal
    request_id: str
    client: GateClient

    async def chat(self, **body: object) -> object:
        return await self.client.chat(**body)

    async def embeddings(self, **body: object) -> object:
        return await self.client.embeddings(**body)

    def openai(self) -> object:
        return self.client.openai()


class _Guarded:
    """One guarded route request: open (authenticate, admit), then close (settle)."""

    def __init__(self, gateway: Gateway, scope: Scope) -> None:
        self.gateway = gateway
        self.scope = scope
        self.request_id = request_id_for(scope)
        self.record: RequestRecord | None = None
        self.context: GateContext | None = None

    async def open(self) -> GateContext:
        if not self.gateway.started:
            raise GatewayNotStartedError(
                "The gateway was not started: start it in the host's lifespan "
                "(FastAPI(lifespan=gateway.lifespan) or 'async with gateway:')."
            )
        path = self.scope["path"]
        if "\x00" in path:  # "%00", decoded by the server: the route names every ledger row
            raise InvalidRequestError("The path contains a NUL character.")
        principal = await authenticate(self.gateway.authenticator, gate_headers(self.scope))
        self.record = RequestRecord(
            request_id=self.request_id,
            principal=principal,
            endpoint="route",
            model="",
            started=time.monotonic(),
            app=app_of(gate_headers(self.scope)),
            route=path,
        )
        await self.gateway.admit(self.record, {})
        client = GateClient(self.gateway, principal, path, self.request_id)
        self.context = GateContext(principal, self.request_id, client)
        return self.context

    async def close(self, error: GateError | None, status: int | None = None) -> None:
        if self.context is not None:
            await self.context.client.aclose()
        if self.record is not None:
            if status is not None:
                self.record.status = status
            await self.gateway.finish(self.record, error)


class GateMiddleware:
    def __init__(self, app: ASGIApp, gateway: Gateway, paths: Sequence[str]) -> None:
        if not paths:
            raise ValueError("GateMiddleware needs the paths it guards, e.g. ['/ai/*'].")
        self.app = app
        self.gateway = gateway
        self._match = re.compile("|".join(translate(p) for p in paths)).match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._match(scope["path"]):
            await self.app(scope, receive, send)
            return
        guarded = _Guarded(self.gateway, scope)
        try:
            context = await guarded.open()
        except GateError as exc:
            await guarded.close(exc)
            await error_response(exc, guarded.request_id)(scope, receive, send)
            return
        scope.setdefault("state", {})["gate"] = context
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).setdefault("x-request-id", guarded.request_id)
            await send(message)

        error: GateError | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # A model call in the handler was refused (402, 429, ...) and not caught.
            refusal = as_gate_error(exc)
            if refusal is None or status is not None:
                raise
            error = refusal
            await error_response(refusal, guarded.request_id)(scope, receive, send_with_id)
        finally:
            await guarded.close(error, status)


class GateDependency:
    """FastAPI's way: `gate: GateContext = Depends(GateDependency(gateway))`.

    Under GateMiddleware it hands over the middleware's context; on its own it
    authenticates and admits, and settles once the response is done. Its refusals are
    `GateError`s: register `gate_exception_handler` so they render OpenAI-shaped.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, request: Request) -> AsyncIterator[GateContext]:
        existing = getattr(request.state, "gate", None)
        if isinstance(existing, GateContext):
            yield existing
            return
        guarded = _Guarded(self.gateway, request.scope)
        try:
            context = await guarded.open()
        except GateError as exc:
            await guarded.close(exc)
            raise
        error: GateError | None = None
        try:
            yield context
        except Exception as exc:
            error = as_gate_error(exc)
            if error is None or error is exc:
                raise
            raise error from exc  # the SDK's refusal, as a GateError the handler renders
        finally:
            await guarded.close(error)
