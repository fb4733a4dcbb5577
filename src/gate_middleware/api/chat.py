"""`POST /chat/completions`: whole answers and SSE streams, relayed chunk by chunk."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from .. import _json
from ..errors import GateError, InvalidRequestError, UpstreamError, error_body
from ..providers.base import Reply
from ..record import RequestRecord, usage_into
from ..retry import Candidate, Outcome
from ..sse import DONE, EventStreamResponse, frame
from ..tokens import estimate_completion_tokens
from ._endpoint import Endpoint, answer, answer_headers, encode_headers

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["ChatAPI"]

logger = logging.getLogger("gate_middleware")

_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_USAGE_FIELD = re.compile(rb'"usage"\s*:\s*\{')
_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ChatAPI(Endpoint):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def handle(self, request: Request) -> Response | EventStreamResponse:
        gateway = self._gateway
        record = await gateway.begin(request, "chat.completions")
        try:
            body = await gateway.read_json(request)
            model, stream = gateway.check_chat(body)
            record.model, record.stream = model, stream
            entry = gateway.catalogue.resolve(model)
            if entry.kind == "embedding":
                raise InvalidRequestError(
                    f"'{entry.id}' is an embedding model; it cannot be used for chat.",
                    param="model",
                    code="model_not_supported",
                )
            await gateway.admit(record, body, entry)
            if stream:
                opened = await gateway.call(request, record, entry, body, _open_stream)
            else:
                answered = await gateway.call(request, record, entry, body, _whole)
        except GateError as exc:
            await gateway.finish(record, exc)
            raise
        except BaseException as exc:
            await gateway.abandon(record, exc)
            raise
        if stream:
            return self._stream(body, opened, record)
        data = answered.value.data
        data["model"] = answered.candidate.entry.id
        usage_into(record, data.get("usage"))
        if not record.usage_reported:
            record.estimated_completion_tokens = estimate_completion_tokens(data)
        await gateway.finish(record)
        return answer(data, record, answered)

    def _stream(
        self,
        body: dict[str, Any],
        opened: Outcome[tuple[AsyncIterator[list[bytes]], list[bytes]]],
        record: RequestRecord,
    ) -> EventStreamResponse:
        chunks, first = opened.value
        entry, deployment = opened.candidate.entry, opened.candidate.deployment
        record.ttft_ms = (time.monotonic() - record.started) * 1000
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        model_field = b'"model":' + json.dumps(entry.id).encode()
        rewrite = entry.id != deployment.model
        gateway = self._gateway

        def relay(batch: list[bytes]) -> tuple[bytes, UpstreamError | None]:
            """Frame a batch for the client; stop at a malformed event, keeping what came before."""
            out: list[bytes] = []
            for payload in batch:
                if not _looks_whole(payload):
                    return b"".join(out), _malformed()
                if _USAGE_FIELD.search(payload):
                    try:
                        chunk = _json.loads(payload)
                    except ValueError:
                        return b"".join(out), _malformed()
                    usage_into(record, chunk.get("usage"))
                    if not client_wants_usage and not chunk.get("choices"):
                        continue  # we asked for usage, the client did not
                if rewrite:
                    payload = _MODEL_FIELD.sub(model_field, payload, count=1)
                out.append(frame(payload))
            # About a token a chunk: the estimate when no usage comes (or the client left).
            record.estimated_completion_tokens += len(out)
            return b"".join(out), None

        async def events() -> AsyncIterator[bytes]:
            error: UpstreamError | None = None
            disconnected = True  # until the stream ends by itself
            try:
                try:
                    out, error = relay(first)
                    if out:
                        yield out
                    if error is None:
                        async for batch in chunks:
                            out, error = relay(batch)
                            if out:
                                yield out
                            if error is not None:
                                break
                except UpstreamError as exc:
                    error = exc
                except Exception:
                    # Whatever broke, the client still gets a well-formed end of stream.
                    logger.exception("The stream of request %s failed.", record.request_id)
                    error = UpstreamError("The upstream stream failed.", code="stream_failed")
                if error is not None:
                    # After the first byte no status can change: the stream ends with
                    # an OpenAI-shaped error event, then [DONE].
                    yield frame(json.dumps(error_body(error)).encode())
                yield DONE
                disconnected = False
            finally:
                with anyio.CancelScope(shield=True):
                    await _close(chunks)
                    await gateway.finish(record, error, disconnected=disconnected)

        async def unsent() -> None:
            await _close(chunks)
            await gateway.finish(record, disconnected=True)

        return EventStreamResponse(
            events(),
            encode_headers({**answer_headers(record, opened), **_STREAM_HEADERS}),
            unsent,
        )


def _whole(candidate: Candidate, body: dict[str, Any]) -> Awaitable[Reply]:
    return candidate.deployment.provider.chat(body)


async def _open_stream(
    candidate: Candidate, body: dict[str, Any]
) -> tuple[AsyncIterator[list[bytes]], list[bytes]]:
    """Open the stream and wait for its first batch: until then a failure can still be
    retried elsewhere, or answered with its own status."""
    chunks = candidate.deployment.provider.stream_chat(body)
    try:
        first = await chunks.__anext__()
        if not all(_looks_whole(payload) for payload in first):
            raise _malformed()  # nothing reached the client yet: still retryable
        return chunks, first
    except StopAsyncIteration:
        # An answer with no chunk at all: no client could use it, and nothing reached
        # the client yet, so another attempt is tried (and the upstream counts a failure).
        await _close(chunks)
        raise UpstreamError(
            "The upstream ended the stream without sending anything.",
            status=502,
            code="upstream_empty_stream",
        ) from None
    except BaseException:
        await _close(chunks)
        raise


def _looks_whole(payload: bytes) -> bool:
    """A cheap check that an event is one JSON object, not a torn or garbled one."""
    return payload.startswith(b"{") and payload.endswith(b"}")


def _malformed() -> UpstreamError:
    return UpstreamError(
        "The upstream sent a malformed stream event.", status=502, code="upstream_bad_response"
    )


async def _close(chunks: AsyncIterator[list[bytes]]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
