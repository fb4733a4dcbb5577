"""`FakeUpstream`: an ASGI app speaking OpenAI's wire format, with fault injection.

In-process (`httpx.ASGITransport(app=upstream)`) or on loopback with uvicorn. A fault
comes from the request (an `x-fake-fault` header, or a `fake_fault` object in the
body, which the gateway passes through untouched), from a schedule (`upstream.schedule`,
one fault per request in order), or at random (`fault_rate` with `random_faults`).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from ..providers.fake import fake_chunks, fake_completion, fake_embeddings, fake_models

__all__ = ["Fault", "FakeUpstream", "UpstreamDropped"]


class UpstreamDropped(Exception):
    """Raised inside the fake to make the server drop the connection."""


@dataclass(frozen=True)
class Fault:
    """What to do wrong with one request.

    status: answer this status with a vendor-shaped error body (529 Anthropic's).
    retry_after / retry_after_ms: the matching headers on that answer.
    latency: seconds to wait before answering.
    drop: "before" drops the connection before any body byte; "mid" drops a stream
        (or a whole body) after `after_chunks` chunks.
    malformed: answer 200 with a body (or a stream event) that is not JSON.
    empty: answer a stream with nothing but its end (`data: [DONE]`).
    """

    status: int | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    latency: float = 0.0
    drop: str | None = None
    after_chunks: int = 2
    malformed: bool = False
    empty: bool = False
    message: str | None = None

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> Fault:
        """From `{"status": 429}` or the header form `status=429,retry_after=2`."""
        if isinstance(value, str):
            value = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
        known = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in value.items():
            if key not in known:
                continue
            kind = str(known[key])
            if "int" in kind:
                kwargs[key] = int(raw)
            elif "float" in kind:
                kwargs[key] = float(raw)
            elif "bool" in kind:
                kwargs[key] = raw in (True, "1", "true", "True")
            else:
                kwargs[key] = str(raw)
        return cls(**kwargs)


def _error_body(fault: Fault) -> bytes:
    status = fault.status or 500
    if status == 529:
        return json.dumps(
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": fault.message or "Overloaded"},
            }
        ).encode()
    kind, code = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("requests", "rate_limit_exceeded"),
    }.get(status, ("server_error", None))
    message = fault.message or f"Fake upstream error {status}."
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()


class FakeUpstream:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        chunk_latency: float = 0.0,
        faults: Iterable[Fault] = (),
        fault_rate: float = 0.0,
        random_faults: Sequence[Fault] = (),
        seed: int | None = None,
        api_key: str | None = None,
        keep: int = 10_000,
    ) -> None:
        self.latency = latency
        self.chunk_latency = chunk_latency
        self.fault_rate = fault_rate
        self.random_faults = list(random_faults)
        self.api_key = api_key
        # The last `keep` requests: a long run (a benchmark) must not grow without end.
        self.requests: deque[dict[str, Any]] = deque(maxlen=keep)
        self.open_streams = 0
        self.disconnects = 0  # streams whose client (the gateway) went away mid-way
        self._scheduled: deque[Fault] = deque(faults)
        self._random = random.Random(seed)

    def schedule(self, *faults: Fault | None) -> None:
        """Faults for the next requests, in order; None lets one request through clean."""
        self._scheduled.extend(f or Fault() for f in faults)

    def _fault_for(self, headers: dict[bytes, bytes], body: dict[str, Any]) -> Fault | None:
        if header := headers.get(b"x-fake-fault"):
            return Fault.parse(header.decode())
        if isinstance(spec := body.pop("fake_fault", None), dict):
            return Fault.parse(spec)
        if self._scheduled:
            return self._scheduled.popleft()
        if self.fault_rate and self._random.random() < self.fault_rate and self.random_faults:
            return self._random.choice(self.random_faults)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"].removeprefix("/v1"), scope["method"]
        headers = dict(scope["headers"])
        if self.api_key is not None and headers.get(b"authorization") != (
            f"Bearer {self.api_key}".encode()
        ):
            await _send(send, 401, _error_body(Fault(status=401, message="Bad upstream key.")))
            return
        if method == "GET" and path == "/models":
            await _send_json(send, {"object": "list", "data": fake_models()})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            await _send(send, 400, _error_body(Fault(status=400, message="Malformed JSON.")))
            return
        fault = self._fault_for(headers, body)
        self.requests.append({"path": path, "body": body, "fault": fault})
        if self.latency or (fault and fault.latency):
            await asyncio.sleep(self.latency + (fault.latency if fault else 0.0))
        if fault and fault.status:
            extra = []
            if fault.retry_after is not None:
                extra.append((b"retry-after", str(fault.retry_after).encode()))
            if fault.retry_after_ms is not None:
                extra.append((b"retry-after-ms", str(fault.retry_after_ms).encode()))
            await _send(send, fault.status, _error_body(fault), extra)
            return
        if method != "POST" or path not in ("/chat/completions", "/embeddings"):
            await _send(send, 404, _error_body(Fault(status=404, message=f"No route {path}.")))
            return
        if path == "/embeddings":
            await _send_json(send, fake_embeddings(body))
        elif body.get("stream"):
            await self._watched_stream(receive, send, body, fault)
        else:
            await self._whole(send, body, fault)

    async def _whole(self, send: Send, body: dict[str, Any], fault: Fault | None) -> None:
        payload = json.dumps(fake_completion(body)).encode()
        if fault and fault.malformed:
            payload = payload[: len(payload) // 2]
        if fault and fault.drop:
            await _start(send, 200, [(b"content-length", str(len(payload)).encode())])
            if fault.drop == "mid":
                await send({"type": "http.response.body", "body": payload[:10], "more_body": True})
            raise UpstreamDropped("fake upstream dropped the connection")
        await _send(send, 200, payload)

    async def _watched_stream(
        self, receive: Receive, send: Send, body: dict[str, Any], fault: Fault | None
    ) -> None:
        """Stream, and stop (counting it) the moment the client disconnects."""
        self.open_streams += 1
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.disconnects += 1
                    group.cancel_scope.cancel()

                async def stream() -> None:
                    await self._stream(send, body, fault)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                group.start_soon(stream)
        finally:
            self.open_streams -= 1

    async def _stream(self, send: Send, body: dict[str, Any], fault: Fault | None) -> None:
        await _start(send, 200, [(b"content-type", b"text/event-stream")])
        if fault and fault.drop == "before":
            raise UpstreamDropped("fake upstream dropped the connection")
        chunks = () if fault and fault.empty else fake_chunks(body)
        for index, chunk in enumerate(chunks):
            if fault and index == fault.after_chunks:
                if fault.drop == "mid":
                    # Half an event, then the connection goes: the worst case for a relay.
                    await send(
                        {"type": "http.response.body", "body": b'data: {"id', "more_body": True}
                    )
                    raise UpstreamDropped("fake upstream dropped the stream")
                if fault.malformed:
                    chunk = b"{not json"
            if self.chunk_latency:
                await asyncio.sleep(self.chunk_latency)
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + chunk + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send(
    send: Send, status: int, payload: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await _start(send, status, headers + (extra or []))
    await send({"type": "http.response.body", "body": payload})


async def _send_json(send: Send, data: dict[str, Any]) -> None:
    await _send(send, 200, json.dumps(data).encode())
