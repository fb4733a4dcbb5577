"""`Endpoint`: a route that is its own ASGI app, for the endpoints every call goes
through; and how their answers are sent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import _json
from .._context import handle_http_exception
from ..errors import REQUEST_ID, GateError, error_response, handle_unexpected
from ..record import RequestRecord
from ..retry import Outcome

__all__ = ["Endpoint", "answer", "answer_headers", "encode_headers"]


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


class _JSONAnswer(Response):
    """JSON bytes and headers of our own: Starlette's `init_headers` scans them all
    again for the two it adds, a dozen on a rate-limited answer."""

    media_type = "application/json"

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        raw = [
            (b"content-length", str(len(self.body)).encode()),
            (b"content-type", b"application/json"),
        ]
        if headers:
            raw += encode_headers(headers)
        self.raw_headers = raw


def encode_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them. The names are the same few on every answer: each is
    lowered and encoded once and kept (measured: 16,000 CPU instructions an answer
    with rate limits' six headers)."""
    raw = []
    names = _NAMES
    for k, v in headers.items():
        name = names.get(k)
        if name is None:
            # ASGI names are lower case; a guard may have written "X-Some-Header".
            name = k.lower().encode("latin-1")
            if len(names) < 1000:
                names[k] = name
        raw.append((name, v.encode("latin-1")))
    return raw


_NAMES: dict[str, bytes] = {}


def answer_headers(record: RequestRecord, outcome: Outcome[Any]) -> dict[str, str]:
    """The guards' headers (rate limits), who answered and the request's id."""
    return {
        **record.headers,
        "x-gate-provider": outcome.candidate.deployment.provider_name,
        "x-gate-attempts": str(outcome.attempts),
        "x-request-id": record.request_id,
    }


def answer(data: Any, record: RequestRecord, outcome: Outcome[Any]) -> Response:
    """A whole answer."""
    return _JSONAnswer(_json.dumps(data), headers=answer_headers(record, outcome))
