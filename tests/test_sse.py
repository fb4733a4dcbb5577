from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gate_middleware.sse import iter_sse_data

STREAM = (
    b": keep-alive\n\n"
    b'data: {"a":1}\n\n'
    b'event: message\nid: 7\ndata: {"b":\n'
    b"data: 2}\n\n"
    b'data: {"c":"x\\ny"}\r\n\r\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [b'{"a":1}', b'{"b":\n2}', b'{"c":"x\\ny"}', b"[DONE]"]


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
async def test_events_are_whole_whatever_the_chunking(size: int) -> None:
    batches = [b async for b in iter_sse_data(pieces(STREAM, size))]
    assert [d for batch in batches for d in batch] == EXPECTED


async def test_a_torn_last_event_is_dropped() -> None:
    torn = b'data: {"a":1}\n\ndata: {"b"'
    assert [b async for b in iter_sse_data(pieces(torn, 5))] == [[b'{"a":1}']]
