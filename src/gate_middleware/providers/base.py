"""The `Provider` protocol: what the gateway needs from any model backend.

Requests and answers are in OpenAI's wire format. A vendor with its own format
(Anthropic Messages, Gemini generateContent) fits by translating inside its provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Provider", "Reply"]


@dataclass(slots=True)
class Reply:
    """A whole (non-streamed) successful answer, already parsed."""

    data: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    """A model backend.

    Failures raise `gate_middleware.UpstreamError` with the upstream's status;
    `stream_chat` raises it from its first step when the upstream refuses, so the
    gateway can still answer with a proper status (or try elsewhere).
    """

    async def startup(self) -> None:
        """Open pools; called from the gateway's lifespan."""

    async def aclose(self) -> None:
        """Close pools; called when the gateway's lifespan ends."""

    async def chat(self, body: dict[str, Any]) -> Reply:
        """A whole chat completion. `body["model"]` is the upstream's name."""

    def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        """Stream a chat completion as batches of OpenAI chunks (JSON bytes), no `[DONE]`.

        A batch is what arrived together (one network read); the gateway writes each
        batch to the client at once. A provider may just as well yield one-chunk lists.
        """

    async def embeddings(self, body: dict[str, Any]) -> Reply:
        """Embeddings, OpenAI shape."""

    async def list_models(self) -> list[dict[str, Any]]:
        """The upstream's own model list, OpenAI shape."""
