"""Token estimates for what must be known before the upstream answers (limits, holds)."""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "MAX_TOKENS",
    "estimate_completion_tokens",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
]

# More tokens than any one request can use, yet an integer any price bills safely.
MAX_TOKENS = 10**9


def estimate_text_tokens(text: str) -> int:
    """About four characters a token: OpenAI's rule of thumb, no tokenizer needed."""
    return (len(text) + 3) // 4


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _parts(content: Any) -> int:
    """What a message's parts other than text cost: an image or a sound, a flat allowance."""
    if not isinstance(content, list):
        return 0
    return sum(
        _PART_TOKENS for part in content if isinstance(part, dict) and part.get("type") != "text"
    )


def _json_tokens(value: Any) -> int:
    """Tools, their calls, a response schema: the upstream reads them as text too."""
    return estimate_text_tokens(json.dumps(value, default=str)) if value else 0


# An image part at high detail costs OpenAI's models 85 + 170 per 512 px tile, about a
# thousand tokens for a large one; a bit more covers most vendors.
_PART_TOKENS = 1500
# A message's calls, read as prompt too: `function_call` is the older form of `tool_calls`.
_CALL_FIELDS = ("tool_calls", "function_call")
# Request fields other than messages that the model reads as prompt.
_PROMPT_FIELDS = ("tools", "functions", "response_format")


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A chat body's prompt (4 tokens of framing per message; images, tools and
    schemas too), or an embedding's input. An estimate for limits and holds, on the
    high side where it cannot know."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 3
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                total += 4 + estimate_text_tokens(_text_of(content)) + _parts(content)
                if "name" in message:  # the model reads who spoke too
                    total += estimate_text_tokens(str(message["name"]))
                for field in _CALL_FIELDS:
                    if field in message:
                        total += _json_tokens(message[field])
        for field in _PROMPT_FIELDS:
            if field in body:
                total += _json_tokens(body[field])
        return total
    inputs = body.get("input")
    if isinstance(inputs, str):
        return max(1, estimate_text_tokens(inputs))
    if isinstance(inputs, list):
        # Token ids (one each), lists of them, or texts; mixed, each counts as what it is.
        return sum(
            1
            if isinstance(item, int)
            else len(item)
            if isinstance(item, list)
            else max(1, estimate_text_tokens(str(item)))
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
