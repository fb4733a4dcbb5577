"""Accounts and keys: creating them, who may manage what, and keys -> principals.

Keys are `sk-gate-` and 43 random URL-safe characters, shown once; the database keeps
their SHA-256 (a key has 256 random bits, so a plain hash is enough: nothing to guess)
and a prefix for listings. An account manages itself (read) and its descendants (read
and write); the admin key from settings manages everything.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from .auth import Level, Principal, StaticKeys
from .errors import (
    AuthenticationError,
    GateError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
    out_of_reach,
)
from .pricing import NANOS_PER_USD, nanos_from_usd
from .storage import Account, ApiKey, LedgerRow, Storage, StorageConflict, Target
from .storage._common import MAX_BIGINT, MAX_INTEGER, MAX_TIME

if TYPE_CHECKING:
    from .quota import LeaseBook

__all__ = ["AccountKeys", "Accounts", "model_allowed", "new_key"]

logger = logging.getLogger("gate_middleware")

KEY_PREFIX = "sk-gate-"
_SHOWN = len(KEY_PREFIX) + 6  # the prefix listings show: "sk-gate-" and 6 random characters
_LIMITS = ("rpm", "tpm", "rpd", "max_concurrency")
_MAX_CACHE = 10_000
_MAX_PATTERNS, _LONGEST_PATTERN = 1000, 256  # allowed_models: as long as model names may be
_REFRESH_AHEAD = 0.2  # of the cache time: a key in use is looked up again this early


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(secret, prefix, digest) of a fresh key."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, secret[:_SHOWN], digest(secret)


def model_allowed(principal: Principal, *names: str | None) -> bool:
    patterns = principal.allowed_models
    if patterns is None:
        return True
    return any(
        name is not None and any(fnmatchcase(name, pattern) for pattern in patterns)
        for name in names
    )


def _within(pattern: str, parents: Iterable[str]) -> bool:
    """Whether every name `pattern` matches, one of `parents` matches too. Not by
    matching the pattern as a name: "[!mini]*" contains "mini", so "*mini*" matched it,
    yet it matches "openai/gpt-4.1". A plain name, the same pattern, or one that starts
    (ends) with the plain text of a parent's "text*" ("*text"); anything else is refused."""
    plain = not _GLOB.search(pattern)
    for parent in parents:
        if pattern == parent or plain and fnmatchcase(pattern, parent):
            return True
        head, tail = parent[:-1], parent[1:]
        if parent.endswith("*") and not _GLOB.search(head) and pattern.startswith(head):
            return True
        # Not with a "]" in it: the pattern's own could close a set ("x[!a]" ends
        # with "a]", yet matches "xb").
        literal_tail = not _GLOB.search(tail) and "]" not in tail
        if parent.startswith("*") and literal_tail and pattern.endswith(tail):
            return True
    return False


_GLOB = re.compile(r"[*?\[]")


def _tightest(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _allowed(lists: Iterable[tuple[str, ...] | None]) -> frozenset[str] | None:
    """The deepest list, less what any level above no longer allows (deepest first)."""
    allowed: frozenset[str] | None = None
    for models in lists:
        if models is None:
            continue
        if allowed is None:
            allowed = frozenset(models)
        else:
            allowed = frozenset(m for m in allowed if _within(m, models))
    return allowed


def principal_for(key: ApiKey, chain: list[Account]) -> Principal:
    holders: list[ApiKey | Account] = [key, *chain]
    return Principal(
        id=key.id,
        key_hint=key.prefix + "...",
        account_id=key.account_id,
        key_id=key.id,
        chain=tuple(Level(a.id, a.multiplier, a.rpm, a.tpm, a.rpd) for a in chain),
        key_multiplier=key.multiplier,
        allowed_models=_allowed([key.allowed_models, *(a.allowed_models for a in reversed(chain))]),
        rpm=_tightest(h.rpm for h in holders),
        tpm=_tightest(h.tpm for h in holders),
        rpd=_tightest(h.rpd for h in holders),
        max_concurrency=_tightest(h.max_concurrency for h in holders),
        spend_limit=key.spend_limit,
    )


class AccountKeys:
    """The `Authenticator` for database keys, the admin key and (optionally) settings keys.

    Lookups are cached for `cache_seconds`, so disabling a key or an account takes
    effect within that bound in every process (at once in the one that did it). A key
    in use is looked up again in the background before its entry ends, and a key not
    cached is looked up once however many of its requests wait: under load an expiry
    would otherwise send every request in flight to the database at the same moment
    (measured: 32 lookups queued, the last after 170 ms).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        admin_key: str | None = None,
        static: StaticKeys | None = None,
        cache_seconds: float = 5.0,
    ) -> None:
        self._storage = storage
        self._admin = digest(admin_key) if admin_key else None
        self._static = static
        self._ttl = cache_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._loading: dict[str, asyncio.Task[Principal | None]] = {}
        self._generation = 0

    def forget(self) -> None:
        # Lookups under way may have read the key before the change: their answers
        # are not cached (the generation moved on), and new requests look up anew.
        self._generation += 1
        self._cache.clear()
        self._loading.clear()

    async def authenticate(self, key: str) -> Principal | None:
        hashed = digest(key)
        if self._admin is not None and hmac.compare_digest(hashed, self._admin):
            return Principal(id="admin", key_hint="admin", admin=True)
        cached = self._cache.get(hashed)
        if cached is not None:
            expires, principal = cached
            now = time.monotonic()
            if now < expires:
                if now >= expires - self._ttl * _REFRESH_AHEAD:
                    self._load(hashed)  # in the background; this request goes on
                return principal
        try:
            # shield: a caller that goes away must not cancel the others' lookup.
            found = await asyncio.shield(self._load(hashed))
        except GateError:
            raise  # disabled or expired
        except Exception as exc:
            if not out_of_reach(exc):
                raise  # a bug, not an outage: a 500, its traceback in the log
            logger.error("Looking up an API key failed: %s", exc)
            raise ServiceUnavailableError(
                "API keys cannot be checked right now: their database is out of reach. "
                "Please try again shortly."
            ) from None
        if found is None:
            return await self._static.authenticate(key) if self._static else None
        return found

    def _load(self, hashed: str) -> asyncio.Task[Principal | None]:
        """The lookup of `hashed` under way, or a new one; it fills or empties the cache."""
        task = self._loading.get(hashed)
        if task is None:
            task = self._loading[hashed] = asyncio.ensure_future(self._refresh(hashed))
            task.add_done_callback(lambda done: self._loaded(hashed, done))
        return task

    def _loaded(self, hashed: str, task: asyncio.Task[Principal | None]) -> None:
        if self._loading.get(hashed) is task:
            del self._loading[hashed]
        if not task.cancelled():
            task.exception()  # retrieved: a background refresh may have no waiter

    async def _refresh(self, hashed: str) -> Principal | None:
        generation = self._generation
        try:
            found = await self._lookup(hashed)
        except BaseException:
            self._cache.pop(hashed, None)  # disabled, expired, or unknown: ask again
            raise
        if generation != self._generation:
            return found  # read before a change: answer this request, cache nothing
        if found is None:
            self._cache.pop(hashed, None)
            return None
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[hashed] = (time.monotonic() + self._ttl, found)
        return found

    async def _lookup(self, hashed: str) -> Principal | None:
        key = await self._storage.key_by_digest(hashed)
        if key is None or not hmac.compare_digest(key.digest, hashed):
            return None
        now = time.time()
        if not key.enabled:
            raise AuthenticationError(
                f"The API key '{key.prefix}...' is disabled.", code="key_disabled"
            )
        if key.expires_at is not None and key.expires_at <= now:
            raise AuthenticationError(
                f"The API key '{key.prefix}...' has expired.", code="key_expired"
            )
        chain = await self._storage.chain(key.account_id)
        for account in chain:
            if not account.enabled or (
                account.expires_at is not None and account.expires_at <= now
            ):
                raise AuthenticationError(
                    f"The account '{account.id}' of this key is disabled or expired.",
                    code="account_disabled",
                )
        return principal_for(key, chain)


# Management ---------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INTEGER:
        raise InvalidRequestError(
            f"'{name}' must be a positive integer (at most {MAX_INTEGER}) or null.", param=name
        )
    return value


def _usd(name: str, value: Any, *, negative: bool = False, cap: int = MAX_BIGINT) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequestError(f"'{name}' must be an amount in USD.", param=name)
    try:
        nanos = nanos_from_usd(value)
    except (ValueError, ArithmeticError):  # decimal's InvalidOperation and Overflow
        raise InvalidRequestError(
            f"'{name}' must be an amount in USD with at most 9 decimals.", param=name
        ) from None
    if nanos == 0 or (nanos < 0 and not negative):
        raise InvalidRequestError(
            f"'{name}' must be {'non-zero' if negative else 'positive'}.", param=name
        )
    most = min(cap, MAX_BIGINT)
    if abs(nanos) > most:
        limit = Decimal(most) / NANOS_PER_USD
        raise InvalidRequestError(f"'{name}' must be at most {limit:f} USD.", param=name)
    return nanos


def _text(name: str, value: Any, longest: int) -> str:
    # PostgreSQL cannot store a NUL character: refused alike on every backend.
    if not isinstance(value, str) or len(value) > longest or "\x00" in value:
        raise InvalidRequestError(
            f"'{name}' must be a string of at most {longest} characters, without NUL.",
            param=name,
        )
    return value


def parse_fields(body: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    """Checked account or key fields from a JSON body (USD amounts -> nanodollars)."""
    known = {
        "name",
        "enabled",
        "expires_at",
        "allowed_models",
        "spend_limit_usd",
        "multiplier",
        *_LIMITS,
    }
    unknown = set(body) - known
    if unknown:
        raise InvalidRequestError(
            f"Unknown field(s): {', '.join(sorted(unknown))}.", param=sorted(unknown)[0]
        )
    fields: dict[str, Any] = {}
    if "name" in body or creating:
        name = _text("name", body.get("name"), 200).strip()
        if not name:
            raise InvalidRequestError("'name' must be a non-empty string.", param="name")
        fields["name"] = name
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise InvalidRequestError("'enabled' must be a boolean.", param="enabled")
        fields["enabled"] = body["enabled"]
    if "expires_at" in body:
        value = body["expires_at"]
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value <= MAX_TIME  # NaN and infinities too
        ):
            raise InvalidRequestError(
                "'expires_at' must be a Unix time in seconds (up to the year 9999) or null.",
                param="expires_at",
            )
        fields["expires_at"] = None if value is None else float(value)
    if "allowed_models" in body:
        models = body["allowed_models"]
        if models is not None and (
            not isinstance(models, list)
            or len(models) > _MAX_PATTERNS
            or not all(
                isinstance(m, str) and m and len(m) <= _LONGEST_PATTERN and "\x00" not in m
                for m in models
            )
        ):
            raise InvalidRequestError(
                "'allowed_models' must be a list of model names (or patterns like 'openai/*'), "
                f"at most {_MAX_PATTERNS} of at most {_LONGEST_PATTERN} characters, without NUL.",
                param="allowed_models",
            )
        fields["allowed_models"] = None if models is None else tuple(models)
    for name in _LIMITS:
        if name in body:
            fields[name] = _positive_int(name, body[name])
    if "spend_limit_usd" in body:
        value = body["spend_limit_usd"]
        fields["spend_limit"] = None if value is None else max(0, _usd("spend_limit_usd", value))
    if "multiplier" in body:
        value = body["multiplier"]
        try:
            multiplier = Decimal(str(value)) if not isinstance(value, bool) else Decimal(-1)
        except InvalidOperation:
            multiplier = Decimal(-1)
        if not multiplier.is_finite() or not Decimal("0.001") <= multiplier <= 1000:
            raise InvalidRequestError(
                "'multiplier' must be a number between 0.001 and 1000.", param="multiplier"
            )
        fields["multiplier"] = multiplier
    return fields


class Accounts:
    """Account and key operations on behalf of a caller, with the scope checks."""

    def __init__(
        self,
        storage: Storage,
        *,
        max_credit: int,
        on_change: Any = None,
        leases: LeaseBook | None = None,
    ) -> None:
        self.storage = storage
        self._max_credit = max_credit
        self._on_change = on_change
        self._leases = leases

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def get(self, actor: Principal, account_id: str, *, write: bool = False) -> Account:
        """The account, if the actor may see it (or change it, with `write`)."""
        # No id has a NUL character, and PostgreSQL cannot even compare one.
        chain = await self.storage.chain(account_id) if "\x00" not in account_id else []
        if not chain:
            raise NotFoundError(f"No account '{account_id}'.", code="account_not_found")
        if actor.admin:
            return chain[-1]
        ids = [a.id for a in chain]
        if actor.account_id not in ids:
            raise NotFoundError(f"No account '{account_id}'.", code="account_not_found")
        if write and account_id == actor.account_id:
            # Its own keys too: else a key could lift its own limits or price.
            raise PermissionDeniedError(
                "An account cannot change its own balance, limits or keys; its parent "
                "account (or the admin) does."
            )
        if write:
            await self._manager(actor)
        return chain[-1]

    async def _manager(self, actor: Principal) -> None:
        """A key with limits of its own only reads: a sub-account or key it made would
        not be bound by them, and would spend the same account's money."""
        key = await self.storage.key(actor.key_id) if actor.key_id else None
        if key is not None and (
            key.multiplier != 1
            or any(
                getattr(key, name) is not None
                for name in ("expires_at", "allowed_models", "spend_limit", *_LIMITS)
            )
        ):
            raise PermissionDeniedError(
                "This key has limits of its own (a spend limit, models, rate limits, an "
                "expiry or a multiplier), so it can read but not manage: what it made "
                "would not be bound by them. Use a key of this account without limits."
            )

    def home(self, actor: Principal) -> str:
        if actor.account_id is None:
            raise InvalidRequestError(
                "This key has no account: name one with 'account_id'.", param="account_id"
            )
        return actor.account_id

    async def create_account(self, actor: Principal, body: Mapping[str, Any]) -> Account:
        body = dict(body)
        parent_id = body.pop("parent_id", None)
        if parent_id is None and not actor.admin:
            parent_id = self.home(actor)
        if parent_id is not None and not isinstance(parent_id, str):
            raise InvalidRequestError("'parent_id' must be an account id.", param="parent_id")
        fields = parse_fields(body, creating=True)
        if parent_id is not None:
            parent = await self.get(actor, parent_id)
            await self._manager(actor)
            _within_parent(fields, parent)
        account = Account(
            id=f"acct_{uuid.uuid4().hex[:16]}",
            parent_id=parent_id,
            created_at=time.time(),
            **fields,
        )
        await self.storage.add_account(account)
        return account

    async def update_account(
        self, actor: Principal, account_id: str, body: Mapping[str, Any]
    ) -> Account:
        account = await self.get(actor, account_id, write=True)
        fields = parse_fields(body, creating=False)
        if account.parent_id is not None:
            parent = await self.storage.account(account.parent_id)
            assert parent is not None
            _within_parent(fields, parent)
        await self._give_back_idle(fields, "account", account_id)
        with _below_spent():
            updated = await self.storage.update_account(account_id, fields)
        self._changed()
        return updated

    async def create_key(
        self, actor: Principal, account_id: str, body: Mapping[str, Any]
    ) -> tuple[ApiKey, str]:
        account = await self.get(actor, account_id, write=True)
        fields = parse_fields(body, creating=True)
        _within_parent(fields, account)
        secret, prefix, hashed = new_key()
        key = ApiKey(
            id=f"key_{uuid.uuid4().hex[:16]}",
            account_id=account_id,
            prefix=prefix,
            digest=hashed,
            created_at=time.time(),
            **fields,
        )
        await self.storage.add_key(key)
        return key, secret

    async def key(self, actor: Principal, key_id: str, *, write: bool = False) -> ApiKey:
        """The key, if the actor may see it (or change it, with `write`)."""
        key = await self.storage.key(key_id) if "\x00" not in key_id else None
        if key is None:
            raise NotFoundError(f"No key '{key_id}'.", code="key_not_found")
        try:
            await self.get(actor, key.account_id, write=write)
        except NotFoundError:
            raise NotFoundError(f"No key '{key_id}'.", code="key_not_found") from None
        return key

    async def update_key(self, actor: Principal, key_id: str, body: Mapping[str, Any]) -> ApiKey:
        key = await self.key(actor, key_id, write=True)
        fields = parse_fields(body, creating=False)
        account = await self.storage.account(key.account_id)
        assert account is not None
        _within_parent(fields, account)
        await self._give_back_idle(fields, "key", key_id)
        with _below_spent():
            updated = await self.storage.update_key(key_id, fields)
        self._changed()
        return updated

    async def _give_back_idle(self, fields: Mapping[str, Any], target: Target, id: str) -> None:
        """A spend limit cannot go below what is spent and leased: this process's
        leases that no request holds from go back first (other processes' go back
        when idle, within a third of the lease time)."""
        if "spend_limit" in fields and self._leases is not None:
            await self._leases.give_back(target, id)

    async def credit(
        self, actor: Principal, account_id: str, body: Mapping[str, Any], *, kind: str
    ) -> Account:
        """A top-up (positive) or an adjustment (either sign), as a ledger entry."""
        account = await self.get(actor, account_id, write=True)
        extra = set(body) - {"amount_usd", "note"}
        if extra:
            raise InvalidRequestError(f"Unknown field(s): {', '.join(sorted(extra))}.")
        if "amount_usd" not in body:
            raise InvalidRequestError(
                "Missing required parameter: 'amount_usd'.", param="amount_usd"
            )
        amount = _usd(
            "amount_usd", body["amount_usd"], negative=kind == "adjustment", cap=self._max_credit
        )
        note = body.get("note")
        if note is not None:
            _text("note", note, 500)
        if account.credits + amount > MAX_BIGINT:
            raise InvalidRequestError(
                "The account's credits would be more than this gateway can hold.",
                param="amount_usd",
            )
        row = LedgerRow(
            id=f"{kind}_{uuid.uuid4().hex}",
            account_id=account_id,
            kind=kind,  # type: ignore[arg-type]
            created=time.time(),
            amount=amount,
            source_account_id=account_id,
            key_id=actor.key_id,
            key_prefix=None if actor.admin else actor.key_hint.removesuffix("..."),
            actor="admin" if actor.admin else actor.account_id,
            note=note,
        )
        try:
            return await self.storage.credit(row, within=account.parent_id)
        except StorageConflict as exc:
            code = "insufficient_parent_balance" if "parent" in str(exc) else "negative_balance"
            raise InvalidRequestError(str(exc), param="amount_usd", code=code) from None


def _within_parent(fields: Mapping[str, Any], parent: Account) -> None:
    """A child (account or key) gets no looser limits than the account above it."""
    for name in _LIMITS:
        mine, theirs = fields.get(name), getattr(parent, name)
        if mine is not None and theirs is not None and mine > theirs:
            raise InvalidRequestError(
                f"'{name}' ({mine}) is above the parent's ({theirs}).", param=name
            )
    limit = fields.get("spend_limit")
    if limit is not None and parent.spend_limit is not None and limit > parent.spend_limit:
        raise InvalidRequestError(
            "'spend_limit_usd' is above the parent's spend limit.", param="spend_limit_usd"
        )
    models = fields.get("allowed_models")
    if models is not None and parent.allowed_models is not None:
        outside = [m for m in models if not _within(m, parent.allowed_models)]
        if outside:
            raise InvalidRequestError(
                f"The parent does not allow: {', '.join(outside)}.", param="allowed_models"
            )


@contextmanager
def _below_spent() -> Iterator[None]:
    """A spend limit set below what is spent or held is the caller's 400."""
    try:
        yield
    except StorageConflict as exc:
        raise InvalidRequestError(str(exc), param="spend_limit_usd", code="below_spent") from None
