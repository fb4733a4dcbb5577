"""Server-sent events: split an upstream byte stream into `data` payloads; send ours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "EventStreamResponse", "frame", "iter_sse_data"]

DONE = b"data: [DONE]\n\n"


def frame(payload: bytes) -> bytes:
    if b"\n" in payload:  # an upstream event of several `data:` lines: each line its own
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual one-line event, without a copy of each line
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


async def iter_sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Yield the data of the events each network read completed, whole, as one batch.

    Never half an event, whatever the chunking; batching keeps one write per read on
    the way out. Comments (`: keep-alive`), `event:` and `id:` lines are dropped.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            # Keep a trailing "\r" whose "\n" is still in flight.
            head, tail = (buffer[:-1], b"\r") if buffer.endswith(b"\r") else (buffer, b"")
            buffer = head.replace(b"\r\n", b"\n") + tail
        start, batch = 0, []
        while (end := buffer.find(b"\n\n", start)) >= 0:
            data = _data_of(buffer[start:end])
            start = end + 2
            if data is not None:
                batch.append(data)
        if start:
            buffer = buffer[start:]
        if batch:
            yield batch
    # An event not closed by a blank line is discarded, as the SSE spec says: it may
    # be the torn half of one that a dropped connection cut.


class EventStreamResponse:
    """An SSE response whose client hanging up cancels the stream (and so the upstream
    call) at once.

    Starlette's StreamingResponse does the same with a task group per response; one
    watcher task that cancels the sending task costs less on every stream.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: list[tuple[bytes, bytes]],
        unsent: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.body = body
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), *headers]
        # Run if the body never started (cancelled while the headers went out): a body
        # generator that never ran does not run its own clean-up when closed.
        self.unsent = unsent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"done": False, "gone": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["done"]:
                state["gone"] = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        started = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            started = True
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            # The client left: nothing more to send, and the task lives on.
            if hasattr(task, "uncancel"):
                task.uncancel()
        finally:
            state["done"] = True
            watcher.cancel()
            if not started and self.unsent is not None:
                with anyio.CancelScope(shield=True):
                    await self.unsent()
