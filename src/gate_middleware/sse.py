"""Server-sent events: split an upstream byte stream into `data` payloads, frame ours."""

from __future__ import annotations

from collections.abc import AsyncIterator

__all__ = ["DONE", "frame", "iter_sse_data"]

DONE = b"data: [DONE]\n\n"


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual one-line event, without a copy of each line
    lines = [
        line[5:].removeprefix(b" ")
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


async def iter_sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's data, whole: never half an event, whatever the chunking.

    Comments (`: keep-alive`), `event:` and `id:` lines are dropped.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            # Keep a trailing "\r" whose "\n" is still in flight.
            head, tail = (buffer[:-1], b"\r") if buffer.endswith(b"\r") else (buffer, b"")
            buffer = head.replace(b"\r\n", b"\n") + tail
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            data = _data_of(buffer[start:end])
            start = end + 2
            if data is not None:
                yield data
        if start:
            buffer = buffer[start:]
    # An event not closed by a blank line is discarded, as the SSE spec says: it may
    # be the torn half of one that a dropped connection cut.
