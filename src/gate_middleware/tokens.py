"""Token estimates for what must be known before the upstream answers (limits, holds)."""

from __future__ import annotations

from typing import Any

__all__ = ["estimate_completion_tokens", "estimate_prompt_tokens", "estimate_text_tokens"]


def estimate_text_tokens(text: str) -> int:
    """About four characters a token: OpenAI's rule of thumb, no tokenizer needed."""
    return (len(text) + 3) // 4


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A chat body's prompt (4 tokens of framing per message), or an embedding's input."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 3
        for message in messages:
            if isinstance(message, dict):
                total += 4 + estimate_text_tokens(_text_of(message.get("content")))
        return total
    inputs = body.get("input")
    if isinstance(inputs, str):
        return max(1, estimate_text_tokens(inputs))
    if isinstance(inputs, list):
        if inputs and isinstance(inputs[0], int):
            return len(inputs)
        return sum(
            len(item) if isinstance(item, list) else max(1, estimate_text_tokens(str(item)))
            for item in inputs
        )
    return 0


def estimate_completion_tokens(answer: dict[str, Any]) -> int:
    """A whole chat answer's tokens, for an upstream that reports no usage."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return 0
    total = 0
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            total += estimate_text_tokens(_text_of(message.get("content")))
    return total
