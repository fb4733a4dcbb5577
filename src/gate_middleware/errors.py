"""One exception tree, rendered in one place as OpenAI-shaped errors.

    GateError
    ├── InvalidRequestError      400 invalid_request_error
    ├── AuthenticationError      401 invalid_api_key
    ├── InsufficientQuotaError   402 insufficient_quota
    ├── PermissionDeniedError    403 permission_denied
    ├── NotFoundError            404 not_found / model_not_found
    ├── PayloadTooLargeError     413 request_too_large
    ├── RateLimitError           429 rate_limit_exceeded
    ├── ServiceUnavailableError  503 service_unavailable, e.g. limits cannot be checked
    ├── UpstreamError            the upstream's status, relayed
    │   └── UpstreamLimitError   429, this gateway's own limit for an upstream
    └── GatewayNotStartedError   500, the host forgot the lifespan
    ConfigurationError           not HTTP: raised when the gateway is built

The official SDKs pick their exception class from the status, so the status is what
matters most; `type` and `code` follow OpenAI's own values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "GateError",
    "GatewayNotStartedError",
    "InsufficientQuotaError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UpstreamError",
    "UpstreamLimitError",
    "error_body",
    "error_response",
]


class ConfigurationError(Exception):
    """A mistake in how the gateway was set up, raised when it is built."""


class GateError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})


class InvalidRequestError(GateError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(GateError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientQuotaError(GateError):
    """The account (or one above it) cannot pay for the most this request may cost."""

    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDeniedError(GateError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(GateError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLargeError(GateError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(GateError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(GateError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamError(GateError):
    """An error answered by (or while reaching) an upstream, relayed to the client.

    `retryable` says whether another attempt could help; `retry_after` is the
    upstream's own hint in seconds, where it gave one.
    """

    type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, status=status, type=type, code=code, param=param)
        self.retry_after = retry_after
        self.retryable = _is_retryable(status) if retryable is None else retryable
        if retry_after is not None:
            self.headers["retry-after"] = str(max(1, round(retry_after)))
        if not self.retryable:
            self.headers["x-should-retry"] = "false"


class UpstreamLimitError(UpstreamError):
    """The gateway's own limit for an upstream (its vendor quota) is full: the attempt
    fails like the vendor's 429 would, but the upstream is not marked unhealthy."""

    def __init__(self, message: str, *, type: str, retry_after: float) -> None:
        super().__init__(
            message,
            status=429,
            type=type,
            code="rate_limit_exceeded",
            retry_after=retry_after,
            retryable=True,
        )


class GatewayNotStartedError(GateError):
    status = 500
    type = "server_error"
    code = "gateway_not_started"


def _is_retryable(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def error_body(exc: GateError) -> dict[str, object]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.type,
            "param": exc.param,
            "code": exc.code,
        }
    }


REQUEST_ID = "gate.request_id"  # the scope key the gateway keeps the request id under


def error_response(exc: GateError, request_id: str | None = None) -> Response:
    headers = exc.headers if request_id is None else {**exc.headers, "x-request-id": request_id}
    return Response(
        json.dumps(error_body(exc)).encode(),
        status_code=exc.status,
        headers=headers,
        media_type="application/json",
    )


async def handle_gate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GateError)
    return error_response(exc, request.scope.get(REQUEST_ID))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get(REQUEST_ID)
    logger = logging.getLogger("gate_middleware")
    if out_of_reach(exc):
        # The database, not the request: a 503 tells clients and SDKs to try again.
        logger.error("The database is out of reach (request %s): %r", request_id, exc)
        error: GateError = database_unavailable()
    else:
        # The traceback goes to the log; the client gets no trace of it.
        logger.error("Unexpected error (request %s).", request_id, exc_info=exc)
        error = GateError("The gateway failed to handle the request.", code="internal_error")
    return error_response(error, request_id)


def database_unavailable() -> ServiceUnavailableError:
    """The answer when `out_of_reach` holds."""
    return ServiceUnavailableError(
        "The gateway's database is out of reach right now. Please try again shortly."
    )


def out_of_reach(exc: BaseException) -> bool:
    """Whether `exc` says a database could not be reached or was busy (a refused or
    dropped connection, a locked SQLite file), not that the request was wrong."""
    # asyncio's TimeoutError is OSError's subclass from Python 3.11 only.
    if isinstance(exc, (OSError, asyncio.TimeoutError, sqlite3.OperationalError)):
        return True
    asyncpg = sys.modules.get("asyncpg")  # only if in use
    return asyncpg is not None and isinstance(
        exc,
        (
            asyncpg.InterfaceError,  # a connection closed mid-operation, a pool closing
            asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError,
            asyncpg.TooManyConnectionsError,
        ),
    )
