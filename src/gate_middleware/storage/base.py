"""Storage protocols: what accounts, keys, the ledger and balances need from a database.

Money is integer nanodollars (10^-9 USD, Google's `Money.nanos`) everywhere, so no sum
ever rounds. A host may bring its own storage by implementing `Storage`; the built-in
ones (memory, SQLite, PostgreSQL) pass the same contract tests.

Balances: an account's `credits` is everything topped up, `spent` everything charged,
`leased` what gateway processes hold right now to spend in memory (see `quota.py`).
Every write keeps `spent + leased <= budget` (the budget is `credits`, capped by
`spend_limit` where one is set) except a settlement the upstream already incurred.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "Account",
    "AccountStore",
    "ApiKey",
    "BalanceStore",
    "Group",
    "Lease",
    "LedgerQuery",
    "LedgerRow",
    "LedgerStore",
    "Spend",
    "Storage",
    "StorageConflict",
    "Target",
]

Target = Literal["account", "key"]


class StorageConflict(Exception):
    """A conditional write refused: the state did not allow it (nothing was written)."""


class LedgerRejected(Exception):
    """The database refused a ledger batch for what it holds (a value it cannot store),
    not for want of a connection: written again as it is, it fails again. Nothing of
    the batch was written."""


@dataclass(slots=True)
class _Limits:
    enabled: bool = True
    expires_at: float | None = None
    allowed_models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    max_concurrency: int | None = None
    spend_limit: int | None = None
    multiplier: Decimal = Decimal(1)
    spent: int = 0
    leased: int = 0
    created_at: float = 0.0


@dataclass(slots=True)
class Account(_Limits):
    id: str = ""
    name: str = ""
    parent_id: str | None = None
    credits: int = 0

    @property
    def budget(self) -> int:
        if self.spend_limit is None:
            return self.credits
        return min(self.credits, self.spend_limit)

    @property
    def available(self) -> int:
        return self.budget - self.spent - self.leased


@dataclass(slots=True)
class ApiKey(_Limits):
    id: str = ""
    account_id: str = ""
    name: str = ""
    prefix: str = ""
    digest: str = ""

    @property
    def available(self) -> int | None:
        if self.spend_limit is None:
            return None
        return self.spend_limit - self.spent - self.leased


class LedgerRow(NamedTuple):
    """One ledger entry: a request as one account (`account_id`) was charged for it,
    or a top-up / adjustment (`amount` credited, `actor` and `note` say who and why).

    A request by a sub-account writes one row per level of its chain, each with that
    level's price; `source_account_id` is the account that made the request.

    A tuple, in the ledger table's column order (`seq`, the database's, last): a
    request makes one or more, and its values go to the database as they are.
    """

    id: str
    account_id: str | None
    kind: Literal["request", "topup", "adjustment"] = "request"
    created: float = 0.0
    amount: int = 0
    source_account_id: str | None = None
    key_id: str | None = None
    key_prefix: str | None = None
    model: str | None = None
    model_id: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    status: int = 0
    error_code: str | None = None
    attempts: int = 0
    app: str | None = None
    stream: bool = False
    estimated: bool = False
    route: str | None = None  # the host route (GateMiddleware) that made the call
    parent_id: str | None = None  # that route's own request id
    actor: str | None = None
    note: str | None = None
    seq: int | None = None


class Spend(NamedTuple):
    """Money a process spent from its lease (or directly, without one). A tuple: a
    request makes one or more, and a frozen dataclass is three times as slow to make."""

    target: Target
    target_id: str
    amount: int
    lease_id: str | None = None


@dataclass(slots=True)
class Lease:
    id: str
    target: Target
    target_id: str
    owner: str
    amount: int
    expires_at: float


@dataclass(slots=True)
class LedgerQuery:
    """Filters over one account's ledger; `before` is the cursor (a row's `seq`)."""

    account_id: str
    start: float | None = None
    end: float | None = None
    model: str | None = None
    key_id: str | None = None
    source_account_id: str | None = None
    status: int | None = None
    kind: str | None = None
    before: int | None = None
    limit: int = 100


@dataclass(slots=True)
class Group:
    key: str | None
    requests: int = 0
    amount: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class AccountStore(Protocol):
    async def add_account(self, account: Account) -> None:
        """Insert; `StorageConflict` if the id exists or the parent does not."""

    async def account(self, account_id: str) -> Account | None: ...

    async def chain(self, account_id: str) -> list[Account]:
        """The account and its ancestors, root first; empty if it does not exist."""

    async def children(self, parent_id: str | None) -> list[Account]:
        """Direct children, or the top-level accounts for None."""

    async def update_account(self, account_id: str, changes: Mapping[str, Any]) -> Account:
        """Set fields (not balances); `StorageConflict` if `spend_limit < spent + leased`."""

    async def add_key(self, key: ApiKey) -> None: ...

    async def key(self, key_id: str) -> ApiKey | None: ...

    async def key_by_digest(self, digest: str) -> ApiKey | None: ...

    async def keys(self, account_id: str) -> list[ApiKey]: ...

    async def update_key(self, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        """Set fields (not balances); `StorageConflict` if `spend_limit < spent + leased`."""


@runtime_checkable
class LedgerStore(Protocol):
    async def write(
        self, rows: Sequence[LedgerRow], spends: Sequence[Spend], *, again: bool = False
    ) -> None:
        """Append rows and apply spends (spent += amount; leased and the lease -= amount
        when it came from one), in one transaction. `again`: this very batch was written
        before and failed, perhaps after its commit (a connection lost before the answer):
        it is written only if its first row is not in the ledger. Raises `LedgerRejected`
        when the database refuses what the batch holds (the writer then sets the rows it
        refuses aside, see `LedgerWriter`)."""

    async def rows(self, query: LedgerQuery) -> list[LedgerRow]:
        """Newest first (by `seq`), at most `query.limit`."""

    async def overview(self, query: LedgerQuery, group_by: str) -> list[Group]:
        """Request rows grouped by `day`, `model`, `key`, `account` (the source), `app`
        or `route`."""

    async def by_request(self, request_id: str, account_id: str) -> LedgerRow | None: ...


@runtime_checkable
class BalanceStore(Protocol):
    async def credit(self, row: LedgerRow, *, within: str | None = None) -> Account:
        """Add `row.amount` to the account's credits and append the row, atomically.

        Refused (`StorageConflict`) if the account would be left with a negative
        available balance, or if `within` names the account's parent and a positive
        amount is more than the parent has left to give: its budget, less its `spent`,
        less what its children hold unspent (`credits - spent` of each, this account's
        included). The check and the credit are one transaction, and top-ups under the
        same parent do not interleave.
        """

    async def lease(
        self,
        target: Target,
        target_id: str,
        *,
        need: int,
        want: int,
        owner: str,
        expires_at: float,
    ) -> Lease | None:
        """Take between `need` and `want` from the target's available money, or None if
        not even `need` is there; one conditional update, never read-then-write."""

    async def renew(self, lease_ids: Sequence[str], expires_at: float) -> set[str]:
        """Extend these leases; the ids of those that still exist (a lease reclaimed
        meanwhile, its process having seemed dead, is gone: its money is no more its)."""

    async def release(self, lease_id: str) -> None:
        """Give the lease's remaining amount back and delete it."""

    async def reclaim(self, now: float) -> int:
        """Release every lease that expired before `now` (a process that died)."""


@runtime_checkable
class Storage(AccountStore, LedgerStore, BalanceStore, Protocol):
    async def open(self) -> None:
        """Connect and bring the schema to the current version."""

    async def close(self) -> None: ...
