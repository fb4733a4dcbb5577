"""`Gateway`: the Starlette application a host mounts (`app.mount("/v1", gateway)`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _body
from ._context import CORS, RequestContext
from .accounting import Accounting
from .api.billing import BillingAPI, billing_routes
from .api.chat import ChatAPI
from .api.embeddings import EmbeddingsAPI
from .api.manage import ManageAPI, manage_routes
from .api.models import ModelsAPI
from .api.ratelimits import RateLimitsAPI
from .auth import PARENT, PRINCIPAL, ROUTE, Authenticator, StaticKeys, authenticate
from .errors import (
    REQUEST_ID,
    ConfigurationError,
    GateError,
    NotFoundError,
    database_unavailable,
    error_response,
    out_of_reach,
)
from .guard import Guard
from .health import HealthStore, health_from_url
from .providers import providers_from_settings
from .providers.base import Provider
from .providers.fake import FakeProvider
from .ratelimit import RateLimitGuard
from .record import RecordHook, RequestRecord, app_of, gate_headers
from .retry import ROUTING_FIELDS, Candidate, Outcome, RetryPolicy, plan, run
from .routing import Catalogue, ModelEntry
from .settings import GateSettings
from .storage import Storage, storage_from_url
from .tokens import estimate_prompt_tokens

__all__ = ["Gateway"]

logger = logging.getLogger("gate_middleware")

T = TypeVar("T")


class Gateway(Starlette):
    """An OpenAI-compatible gateway, mountable in any Starlette or FastAPI app.

    Mounted apps get no lifespan events, so the host starts the gateway itself:
    `FastAPI(lifespan=gateway.lifespan)`, or `async with gateway:` in its own lifespan.
    """

    def __init__(
        self,
        settings: GateSettings | None = None,
        *,
        providers: Mapping[str, Provider] | None = None,
        authenticator: Authenticator | None = None,
        storage: Storage | None = None,
        http_client: httpx.AsyncClient | None = None,
        health: HealthStore | None = None,
        guards: Iterable[Guard] = (),
        record_hooks: Iterable[RecordHook] = (),
        debug: bool = False,
    ) -> None:
        self.settings = settings or GateSettings()
        self.providers: dict[str, Provider] = providers_from_settings(self.settings, http_client)
        self.providers.update(providers or {})
        if not self.providers:
            logger.warning("No upstream is configured: serving the built-in fake provider.")
            self.providers["fake"] = FakeProvider(latency=self.settings.fake_latency)
        self.catalogue = Catalogue.build(self.settings, self.providers)
        if storage is None and self.settings.database_url:
            storage = storage_from_url(self.settings.database_url)
        self.accounting = (
            Accounting(storage, self.settings, self.catalogue) if storage is not None else None
        )
        if authenticator is None and self.accounting is not None:
            authenticator = self.accounting.keys
        if authenticator is None:
            keys = [key.get_secret_value() for key in self.settings.api_keys]
            if not keys:
                raise ConfigurationError(
                    "The gateway has no API keys: set GATE_API_KEYS, or pass authenticator=."
                )
            authenticator = StaticKeys(keys)
        self.authenticator = authenticator
        self.health = health or health_from_url(
            self.settings.health_storage,
            failures=self.settings.health_failures,
            window=self.settings.health_window,
            cooldown=self.settings.health_cooldown,
        )
        self.retry_policy = RetryPolicy(
            max_retries=self.settings.max_retries,
            deadline=self.settings.retry_deadline,
            backoff=self.settings.retry_backoff,
            backoff_max=self.settings.retry_backoff_max,
            retry_after_cap=self.settings.retry_after_cap,
        )
        self.guards = list(guards)
        self.record_hooks = list(record_hooks)
        if self.accounting is not None:
            self.guards.insert(0, self.accounting)
            self.record_hooks.insert(0, self.accounting.record)
        # Rate limits first: the cheapest refusal, before any quota is held.
        self.rate_limiter = RateLimitGuard(
            self.settings.rate_limits, self.catalogue, self.providers.keys()
        )
        self.guards.insert(0, self.rate_limiter)
        self._max_body = self.settings.max_body_bytes
        self._users = 0

        chat, embeddings, models = ChatAPI(self), EmbeddingsAPI(self), ModelsAPI(self)
        routes = [
            Route("/chat/completions", chat, methods=["POST"]),
            Route("/embeddings", embeddings, methods=["POST"]),
            Route("/models", models.list, methods=["GET"]),
            Route("/models/{model_id:path}", models.retrieve, methods=["GET"]),
            Route("/ratelimits", RateLimitsAPI(self).get, methods=["GET"]),
        ]
        if self.accounting is not None:
            routes += billing_routes(BillingAPI(self)) + manage_routes(ManageAPI(self))
        middleware = [Middleware(RequestContext, gateway=self)]
        if self.settings.cors_origins:
            middleware.insert(
                0,
                Middleware(
                    CORS,
                    allow_origins=self.settings.cors_origins,
                    allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
                    allow_headers=["*"],
                    expose_headers=[
                        "x-request-id",
                        "x-gate-provider",
                        "retry-after",
                        *(
                            f"x-ratelimit-{field}-{kind}"
                            for field in ("limit", "remaining", "reset")
                            for kind in ("requests", "tokens")
                        ),
                    ],
                ),
            )
        super().__init__(debug=debug, routes=routes, middleware=middleware, lifespan=self.lifespan)
        self.router.default = self._not_found
        # For the 404 of an unknown path: what does exist.
        self._paths = [
            ("/".join(sorted(route.methods - {"HEAD"})), route.path.replace(":path}", "}"))
            for route in routes
            if isinstance(route, Route) and route.methods
        ]

    def build_middleware_stack(self) -> ASGIApp:
        # No ServerErrorMiddleware or ExceptionMiddleware: each would wrap every streamed
        # chunk's `send` once more. Routes render their own errors (see _context.py).
        app: ASGIApp = self.router
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app

    # Lifecycle -------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._users > 0

    def _resources(self) -> list[Any]:
        """What the lifespan opens, in order (and closes in reverse: the accounting
        first, so the last ledger rows and spends are written and the leases go back
        while the rest still stands)."""
        accounting = [self.accounting] if self.accounting is not None else []
        return [self.health, *self.providers.values(), self.rate_limiter, *accounting]

    async def __aenter__(self) -> Gateway:
        if self._users == 0:
            opened: list[Any] = []
            try:
                for resource in self._resources():
                    await resource.startup()
                    opened.append(resource)
            except BaseException:
                for resource in reversed(opened):
                    await resource.aclose()
                raise
        self._users += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._users -= 1
        if self._users == 0:
            failed: BaseException | None = None
            for resource in reversed(self._resources()):
                try:
                    await resource.aclose()
                except BaseException as exc:  # the others close all the same
                    logger.error("Closing %s failed: %r", type(resource).__name__, exc)
                    failed = failed or exc
            if failed is not None:
                raise failed

    def root_routes(self) -> list[Route]:
        """Billing routes for the host's root, for tools that call them without `/v1`:
        `Starlette(routes=[*gateway.root_routes(), Mount("/v1", gateway)])`."""
        if self.accounting is None:
            return []
        return [
            Route(path, self, methods=["GET"])
            for path in ("/dashboard/billing/subscription", "/dashboard/billing/usage")
        ]

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """For `FastAPI(lifespan=gateway.lifespan)` or `Starlette(lifespan=...)`."""
        async with self:
            yield

    # Helpers the API modules share ------------------------------------------------

    async def begin(self, request: Request, endpoint: str) -> RequestRecord:
        """Authenticate the caller and open the request's record."""
        scope = request.scope
        headers = gate_headers(scope)
        # A call from a host route (GateMiddleware's client) arrives authenticated.
        principal = scope.get(PRINCIPAL) or await authenticate(self.authenticator, headers)
        return RequestRecord(
            request_id=scope[REQUEST_ID],
            principal=principal,
            endpoint=endpoint,
            model="",
            started=time.monotonic(),
            app=app_of(headers),
            route=scope.get(ROUTE),
            parent_id=scope.get(PARENT),
        )

    async def admit(
        self, record: RequestRecord, body: dict[str, Any], entry: ModelEntry | None = None
    ) -> None:
        """Plan who may answer the model `entry`, then run every guard's `admit`; if one
        refuses, release what the others took."""
        if entry is not None:
            kind = "embedding" if record.endpoint == "embeddings" else "chat"
            record.candidates = plan(self.catalogue, entry, body, kind)
        record.estimated_prompt_tokens = estimate_prompt_tokens(body)
        if record.endpoint.startswith("chat"):  # checked and bounded there (_body.py)
            # Both may come (an SDK sends one, a tool adds the other): the larger binds.
            limit, other = body.get("max_completion_tokens"), body.get("max_tokens")
            if isinstance(other, int) and not (isinstance(limit, int) and limit >= other):
                limit = other
            record.max_completion_tokens = limit if isinstance(limit, int) else None
            choices = body.get("n")
            record.choices = choices if isinstance(choices, int) and choices > 1 else 1
        admitted: list[Guard] = []
        try:
            for guard in self.guards:
                await guard.admit(record)
                admitted.append(guard)
        except BaseException:
            record.status = 0  # refused before any call: nothing used
            with anyio.CancelScope(shield=True):  # also when cancelled: settle regardless
                for guard in reversed(admitted):
                    await guard.settle(record)
            raise
        record.admitted = True

    async def finish(
        self, record: RequestRecord, error: GateError | None = None, *, disconnected: bool = False
    ) -> None:
        """Close the record: settle the guards (once) and hand it to the hooks."""
        record.latency_ms = (time.monotonic() - record.started) * 1000
        if error is not None:
            record.status, record.error_code = error.status, error.code
            if not record.headers:  # refused before its limits were checked (a bad body)
                await self.rate_limiter.tell(record)
            error.headers.update(record.headers)
        elif disconnected:
            record.status, record.error_code = 499, "client_disconnected"
        cancelled: BaseException | None = None
        if record.admitted:
            record.admitted = False  # settle exactly once
            for n, guard in enumerate(self.guards):
                try:
                    await guard.settle(record)
                except Exception:
                    logger.exception("A guard failed to settle (request %s).", record.request_id)
                except BaseException as exc:
                    # Cancelled mid-settlement (a host's timeout, a client gone): the
                    # other guards settle regardless, and the row is written.
                    cancelled = exc
                    with anyio.CancelScope(shield=True):
                        for other in self.guards[n + 1 :]:
                            await self._settle(other, record)
                    break
        for hook in self.record_hooks:
            try:
                hook(record)
            except Exception:
                logger.exception("A record hook failed (request %s).", record.request_id)
        if cancelled is not None:
            raise cancelled

    @staticmethod
    async def _settle(guard: Guard, record: RequestRecord) -> None:
        try:
            await guard.settle(record)
        except Exception:
            logger.exception("A guard failed to settle (request %s).", record.request_id)

    async def abandon(self, record: RequestRecord, exc: BaseException) -> None:
        """Close the record of a request ended by anything but a `GateError`: a bug, or
        the request cancelled (a host's timeout, a shutdown). Its guards settle all the
        same (its quota hold, its slot in flight) and its ledger row is written."""
        if isinstance(exc, asyncio.CancelledError):
            error = GateError("The request was cancelled.", status=499, code="cancelled")
        elif out_of_reach(exc):
            error = database_unavailable()
        else:
            error = GateError("The gateway failed to handle the request.", code="internal_error")
        with anyio.CancelScope(shield=True):
            await self.finish(record, error)

    async def call(
        self,
        request: Request,
        record: RequestRecord,
        entry: ModelEntry,
        body: dict[str, Any],
        call: Callable[[Candidate, dict[str, Any]], Awaitable[T]],
    ) -> Outcome[T]:
        """Call the upstream with retries and fallbacks; fill the record with who answered."""
        candidates = record.candidates
        upstream_body = {k: v for k, v in body.items() if k not in ROUTING_FIELDS}

        limiter = self.rate_limiter

        async def limited(candidate: Candidate, body: dict[str, Any]) -> T:
            # An attempt's own limits (its upstream's, a fallback model's) count each one.
            await limiter.reach(record, candidate)
            return await call(candidate, body)

        def attempt(candidate: Candidate) -> Awaitable[T]:
            # Not a coroutine itself: each await level is walked again at every
            # suspension of the upstream call, so the chain is kept short.
            record.model_id = candidate.entry.id
            record.provider = candidate.deployment.provider_name
            record.upstream_model = candidate.deployment.model
            record.attempts += 1
            body = {**upstream_body, "model": candidate.deployment.model}
            return (limited if limiter.limits_attempts else call)(candidate, body)

        return await run(
            candidates,
            attempt,
            policy=self.retry_policy.for_request(entry, gate_headers(request.scope)),
            health=self.health,
            catalogue=self.catalogue,
            started=record.started,
        )

    async def read_json(self, request: Request) -> dict[str, Any]:
        return await _body.read_json(request.scope, request.receive, self._max_body)

    check_chat = staticmethod(_body.check_chat)
    check_embeddings = staticmethod(_body.check_embeddings)

    async def _not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        path = scope.get("path", "")
        paths = ", ".join(f"{methods} {root}{p}" for methods, p in self._paths)
        message = f"Unknown path '{path}'. This gateway serves: {paths}."
        if root and path.startswith(root + root):
            message += f" The base URL may repeat '{root}'."
        error = NotFoundError(message, code="unknown_url")
        await error_response(error, scope.get(REQUEST_ID))(scope, receive, send)
