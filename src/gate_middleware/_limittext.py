"""What a client reads about its limits, in OpenAI's words and formats."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem

from ._windows import Limit
from .errors import RateLimitError, ServiceUnavailableError

__all__ = [
    "duration",
    "openai_headers",
    "refused",
    "too_large",
    "too_many_in_flight",
    "unavailable",
    "window",
]

_ABBREVIATIONS = {
    ("requests", 60): "RPM",
    ("tokens", 60): "TPM",
    ("requests", 86400): "RPD",
    ("tokens", 86400): "TPD",
}


def openai_headers(into: dict[str, str], limit: Limit, remaining: int, reset_in: float) -> None:
    """Set OpenAI's three x-ratelimit-* headers of the limit's kind in `into`."""
    limit_name, remaining_name, reset_name = limit.headers
    into[limit_name] = limit.amount_text
    into[remaining_name] = str(remaining) if remaining > 0 else "0"
    into[reset_name] = duration(reset_in) if reset_in > 0 else "0s"


def duration(seconds: float) -> str:
    """OpenAI's reset format (Go's durations): "20ms", "1.5s", "6m0s", "1h2m3s"."""
    ms = int(seconds * 1000 + 0.5)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    if ms < 60_000:
        return f"{ms / 1000:g}s"  # at most 5 digits: %g writes them all, no trailing 0
    whole = ms // 1000
    secs = f"{whole % 60 + ms % 1000 / 1000:g}"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes}m{secs}s"
    return f"{minutes // 60}h{minutes % 60}m{secs}s"


def window(item: RateLimitItem) -> str:
    name = item.GRANULARITY.name
    return name if item.multiples == 1 else f"{item.multiples} {name}s"


def refused(limit: Limit, cost: int, reset: float, remaining: int) -> RateLimitError:
    wait = max(reset - time.time(), 0.001)
    amount = limit.item.amount
    headers = {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))}
    if wait > 60:
        # The SDKs honour retry-after only up to a minute, then retry at once: in vain.
        headers["x-should-retry"] = "false"
    return RateLimitError(
        f"Rate limit reached for {_whose(limit)} on {_what(limit)}: Limit {amount}, "
        f"Used {amount - remaining}, Requested {cost}. Please try again in {duration(wait)}.",
        type=limit.kind,
        headers=headers,
    )


def too_large(limit: Limit, cost: int) -> RateLimitError:
    return RateLimitError(
        f"Request too large for {_whose(limit)} on {_what(limit)}: Limit {limit.item.amount}, "
        f"Requested {cost}. Lower max_tokens or shorten the prompt.",
        type="tokens",
        headers={"x-should-retry": "false"},
    )


def too_many_in_flight(key_hint: str, limit: int) -> RateLimitError:
    return RateLimitError(
        f"Too many requests in flight for key {key_hint}: at most {limit} at a time. "
        "Please try again when one of them has finished.",
        headers={"retry-after": "1"},
    )


def unavailable(action: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"Rate limits cannot be {action} right now: their storage is unreachable. "
        "Please try again shortly."
    )


def _whose(limit: Limit) -> str:
    if limit.scope == "key":
        return f"key {limit.name}"
    if limit.scope == "model":
        return f"model {limit.name} on this key"
    if limit.scope == "deployment":
        return f"upstream {limit.name}"
    if limit.scope == "account":
        return f"account {limit.name}"
    return "this gateway"


def _what(limit: Limit) -> str:
    text = f"{limit.kind} per {window(limit.item)}"
    abbreviation = _ABBREVIATIONS.get((limit.kind, limit.item.get_expiry()))
    return f"{text} ({abbreviation})" if abbreviation else text
