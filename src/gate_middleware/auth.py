"""Who is calling: bearer keys -> principals, behind a protocol the account system replaces."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, runtime_checkable

from .errors import AuthenticationError

__all__ = ["Authenticator", "Level", "Principal", "StaticKeys", "bearer_key", "key_hint"]


@dataclass(frozen=True, slots=True)
class Level:
    """One account of a caller's chain: the price multiplier it is charged at, and its
    own rate limits, which every request of its keys and sub-accounts counts against."""

    account_id: str
    multiplier: Decimal = Decimal(1)
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None


# Scope keys set only in-process (by GateMiddleware's client), never from a request.
PRINCIPAL = "gate.principal"
ROUTE = "gate.route"
PARENT = "gate.parent"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; `key_hint` is all of the key that may be shown or logged.

    `id` is what per-caller limits count by (the key). Keys from the database also
    carry their account, its chain of accounts up to the top (root first, each with
    its multiplier), and the tightest limits of the key and every account above it:
    `rpm`, `tpm`, `rpd`, `max_concurrency` (read by rate limits), `allowed_models`
    (None: any) and the key's own `spend_limit` in nanodollars.
    """

    id: str
    key_hint: str
    account_id: str | None = None
    key_id: str | None = None
    chain: tuple[Level, ...] = ()
    key_multiplier: Decimal = Decimal(1)
    allowed_models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    max_concurrency: int | None = None
    spend_limit: int | None = None
    admin: bool = False


@runtime_checkable
class Authenticator(Protocol):
    async def authenticate(self, key: str) -> Principal | None:
        """The caller this key belongs to, or None for an unknown key."""


def key_hint(key: str) -> str:
    return key[:8] + "..." if len(key) > 8 else "***"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class StaticKeys:
    """Keys fixed in settings. Stored as digests, so the lookup leaks no key by timing."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._principals = {
            _digest(key): Principal(id=f"key-{index}", key_hint=key_hint(key))
            for index, key in enumerate(keys)
        }

    def __len__(self) -> int:
        return len(self._principals)

    async def authenticate(self, key: str) -> Principal | None:
        return self._principals.get(_digest(key))


def bearer_key(headers: Mapping[str, str]) -> str:
    """The caller's key from `Authorization: Bearer`, or `x-api-key` as Anthropic's SDKs send."""
    value = headers.get("authorization")
    if value:
        scheme, _, key = value.partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer" and key:
            return key
    if key := headers.get("x-api-key", "").strip():
        return key
    if value:
        raise AuthenticationError(
            "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_api_key"
        )
    raise AuthenticationError(
        "You didn't provide an API key. Send it in the Authorization header "
        "as 'Authorization: Bearer YOUR_KEY'.",
        code="invalid_api_key",
    )


async def authenticate(authenticator: Authenticator, headers: Mapping[str, str]) -> Principal:
    key = bearer_key(headers)
    principal = await authenticator.authenticate(key)
    if principal is None:
        raise AuthenticationError(f"Incorrect API key provided: '{key_hint(key)}'.")
    return principal
