"""The built-in fake: offline, deterministic answers in OpenAI's wire format.

Served when no vendor is configured, so a first run needs no keys. The same builders
feed `gate_middleware.testing.FakeUpstream`, which adds an HTTP face and faults.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..errors import InvalidRequestError
from ..tokens import estimate_prompt_tokens, estimate_text_tokens
from .base import Reply

__all__ = [
    "FakeProvider",
    "fake_chunks",
    "fake_completion",
    "fake_embeddings",
    "fake_models",
]

_SENTENCE = (
    "the gateway answers every request with care while limits keep each key fair and "
    "ledgers count tokens exactly so money never drifts between accounts or streams"
)
_WORDS = _SENTENCE.split()
_DEFAULT_WORDS = 16
_MAX_WORDS = 8192
_CREATED = 1_760_000_000  # fixed, so the same request gets byte-identical answers


def _plan(body: dict[str, Any]) -> tuple[str, list[str], str, dict[str, int]]:
    messages = body.get("messages") or []
    seed_text = json.dumps(messages, sort_keys=True)
    seed = zlib.crc32(seed_text.encode())
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    count = min(int(limit), _MAX_WORDS) if isinstance(limit, int) and limit > 0 else _DEFAULT_WORDS
    words = [_WORDS[(seed + i * 7) % len(_WORDS)] for i in range(count)]
    pieces = [w + " " for w in words[:-1]] + [words[-1] + "."]
    finish = "length" if isinstance(limit, int) and limit > 0 else "stop"
    prompt = estimate_prompt_tokens({"messages": messages})
    usage = {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}
    digest = hashlib.blake2b(f"{seed_text}|{body.get('model')}".encode(), digest_size=12)
    return f"chatcmpl-fake{digest.hexdigest()}", pieces, finish, usage


def fake_completion(body: dict[str, Any]) -> dict[str, Any]:
    completion_id, pieces, finish, usage = _plan(body)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": _CREATED,
        "model": body.get("model"),
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }


def fake_chunks(body: dict[str, Any]) -> Iterator[bytes]:
    """The stream's chunks as JSON bytes, usage last when `stream_options` asks for it."""
    completion_id, pieces, finish, usage = _plan(body)
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    head = (
        f'{{"id":"{completion_id}","object":"chat.completion.chunk","created":{_CREATED},'
        f'"model":{json.dumps(body.get("model"))},"system_fingerprint":"fp_fake","choices":'
    )
    tail = ',"usage":null}' if with_usage else "}"

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return (head + json.dumps([choice], separators=(",", ":")) + tail).encode()

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in pieces:
        yield chunk({"content": piece})
    yield chunk({}, finish)
    if with_usage:
        yield (head + "[]," + f'"usage":{json.dumps(usage, separators=(",", ":"))}}}').encode()


def fake_embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
    ):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequestError("'input' must be a string or a non-empty array.", param="input")
    dimensions = body.get("dimensions")
    size = dimensions if isinstance(dimensions, int) and 0 < dimensions <= 4096 else 256
    as_base64 = body.get("encoding_format") == "base64"
    data, tokens = [], 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else json.dumps(item)
        tokens += max(1, estimate_text_tokens(text))
        rng = random.Random(zlib.crc32(text.encode()))
        vector = [rng.uniform(-1.0, 1.0) for _ in range(size)]
        norm = sum(v * v for v in vector) ** 0.5
        vector = [v / norm for v in vector]
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{size}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def fake_models() -> list[dict[str, Any]]:
    return [{"id": "fake-chat", "object": "model", "created": _CREATED, "owned_by": "fake"}]


class FakeProvider:
    """Answers in-process; `latency` is the pause before each stream chunk."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency

    def __repr__(self) -> str:
        return "FakeProvider()"

    async def startup(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def chat(self, body: dict[str, Any]) -> Reply:
        if self.latency:
            await asyncio.sleep(self.latency)
        return Reply(fake_completion(body))

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        body = {**body, "stream_options": {"include_usage": True}}
        if not self.latency:
            yield list(fake_chunks(body))
            return
        for chunk in fake_chunks(body):
            await asyncio.sleep(self.latency)
            yield [chunk]

    async def embeddings(self, body: dict[str, Any]) -> Reply:
        return Reply(fake_embeddings(body))

    async def list_models(self) -> list[dict[str, Any]]:
        return fake_models()
