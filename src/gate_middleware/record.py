"""What one request did: the facts metering, ledgers and logs are made from."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from .tokens import MAX_TOKENS

if TYPE_CHECKING:
    from .auth import Principal
    from .retry import Candidate

logger = logging.getLogger("gate_middleware")

__all__ = [
    "HEADERS",
    "RecordHook",
    "RequestRecord",
    "app_of",
    "gate_headers",
    "request_id_for",
    "usage_into",
]


@dataclass(slots=True)
class RequestRecord:
    """One request, filled in as it goes; guards and hooks read it.

    `headers` are added to the response (guards put rate-limit headers there);
    `estimated_prompt_tokens` and `max_completion_tokens` are known before the call,
    the token counts after it; `estimated_completion_tokens` is what the relay saw,
    for when the upstream reports no usage (or the client left). `route` is the host
    route that made the call (through `GateMiddleware`), `parent_id` that route's own
    request id.
    """

    request_id: str
    principal: Principal
    endpoint: str
    model: str
    stream: bool = False
    model_id: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    status: int = 200
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_reported: bool = False
    started: float = 0.0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    app: str | None = None
    route: str | None = None
    parent_id: str | None = None
    estimated_prompt_tokens: int = 0
    estimated_completion_tokens: int = 0
    max_completion_tokens: int | None = None
    choices: int = 1  # `n`: each choice can use up to `max_completion_tokens`
    # Who may answer, in the order tried (fallbacks too): guards may drop some.
    candidates: list[Candidate] = field(default_factory=list)
    attempts: int = 0
    admitted: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key_hint(self) -> str:
        return self.principal.key_hint

    @property
    def usage_estimated(self) -> bool:
        """No usage came, yet the upstream worked: an answer, or a stream that relayed
        something before it ended (the client left, or the upstream cut it off)."""
        return not self.usage_reported and (self.status in (200, 499) or self.ttft_ms is not None)


RecordHook = Callable[[RequestRecord], None]


HEADERS = "gate.headers"  # the scope key of `gate_headers`' answer
_WANTED = frozenset(
    (
        b"authorization",
        b"x-api-key",
        b"x-request-id",
        b"content-length",
        b"x-title",
        b"http-referer",
        b"x-gate-max-retries",
        b"x-gate-deadline",
    )
)


def gate_headers(scope: Scope) -> dict[str, str]:
    """The few request headers the gateway reads, in one pass over them (Starlette's
    `Headers` walks them all again for every lookup); the first of a repeated one."""
    found = scope.get(HEADERS)
    if found is None:
        found = scope[HEADERS] = {}
        for name, value in scope["headers"]:
            if name in _WANTED:
                found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def app_of(headers: Mapping[str, str]) -> str | None:
    """The calling app, as OpenRouter reads it (`X-Title`, else `HTTP-Referer`): short
    enough to store in every ledger row of the request (refused ones too), no NUL."""
    app = headers.get("x-title") or headers.get("http-referer")
    if app and (len(app) > _LONGEST_APP or "\x00" in app):
        app = app.replace("\x00", "")[:_LONGEST_APP]
    return app or None


_LONGEST_APP = 256


def request_id_for(scope: Scope) -> str:
    """The request's own `x-request-id` (short and printable: it is echoed and stored),
    or a new one."""
    text = gate_headers(scope).get("x-request-id", "")[:128]
    if text and text.isprintable():
        return text
    return f"req_{_PROCESS}{next(_SEQUENCE):012x}"


# A random prefix per process and a counter: unique across processes and hosts, and
# far cheaper per request than 16 fresh random bytes (a system call each).
_PROCESS = os.urandom(10).hex()
_SEQUENCE = itertools.count(1)


def _reseed() -> None:
    """A forked worker (gunicorn --preload) gets a prefix of its own."""
    global _PROCESS, _SEQUENCE
    _PROCESS, _SEQUENCE = os.urandom(10).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def usage_into(record: RequestRecord, usage: Any) -> None:
    """Copy an OpenAI `usage` object (with its optional details) into the record.

    Counts no request can have (negative, or past `MAX_TOKENS`) are not believed: a
    negative one would credit the caller, a huge one overflow the ledger's integers.
    The request is then billed on its estimate, as if no usage had come.
    """
    if not isinstance(usage, dict) or not (
        isinstance(usage.get("prompt_tokens"), int)
        or isinstance(usage.get("completion_tokens"), int)
    ):
        return  # no count: not a usage (`{}` would bill nothing)
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    counts = (
        _int(usage.get("prompt_tokens")),
        _int(usage.get("completion_tokens")),
        _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        _int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0,
    )
    if min(counts) < 0 or max(counts) > MAX_TOKENS:
        logger.warning(
            "Request %s: the upstream reported usage no request can have (%s); "
            "billed on the estimate.",
            record.request_id,
            usage,
        )
        return
    record.usage_reported = True
    (
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.reasoning_tokens,
    ) = counts


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
