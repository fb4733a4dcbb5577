"""In-process storage for tests and one-process demos: nothing survives a restart.

No method awaits before it is done, so each one is atomic on the event loop.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ._common import check_spend_limit, day_of, group_key, matches, parent_short, settable
from .base import (
    Account,
    ApiKey,
    Group,
    Lease,
    LedgerQuery,
    LedgerRow,
    Spend,
    StorageConflict,
    Target,
)

__all__ = ["MemoryStorage"]


class MemoryStorage:
    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._keys: dict[str, ApiKey] = {}
        self._digests: dict[str, str] = {}
        self._ledger: list[LedgerRow] = []
        self._leases: dict[str, Lease] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # Accounts and keys ------------------------------------------------------------

    async def add_account(self, account: Account) -> None:
        if account.id in self._accounts:
            raise StorageConflict(f"Account {account.id!r} exists.")
        if account.parent_id is not None and account.parent_id not in self._accounts:
            raise StorageConflict(f"Parent account {account.parent_id!r} does not exist.")
        self._accounts[account.id] = dataclasses.replace(account)

    async def account(self, account_id: str) -> Account | None:
        account = self._accounts.get(account_id)
        return dataclasses.replace(account) if account else None

    async def chain(self, account_id: str) -> list[Account]:
        chain: list[Account] = []
        current = self._accounts.get(account_id)
        while current is not None:
            chain.append(dataclasses.replace(current))
            current = self._accounts.get(current.parent_id) if current.parent_id else None
        return chain[::-1]

    async def children(self, parent_id: str | None) -> list[Account]:
        return [
            dataclasses.replace(a)
            for a in sorted(self._accounts.values(), key=lambda a: (a.created_at, a.id))
            if a.parent_id == parent_id
        ]

    async def update_account(self, account_id: str, changes: Mapping[str, Any]) -> Account:
        account = self._accounts.get(account_id)
        if account is None:
            raise StorageConflict(f"Account {account_id!r} does not exist.")
        _set(account, changes)
        return dataclasses.replace(account)

    async def add_key(self, key: ApiKey) -> None:
        if key.id in self._keys or key.digest in self._digests:
            raise StorageConflict("The key exists.")
        if key.account_id not in self._accounts:
            raise StorageConflict(f"Account {key.account_id!r} does not exist.")
        self._keys[key.id] = dataclasses.replace(key)
        self._digests[key.digest] = key.id

    async def key(self, key_id: str) -> ApiKey | None:
        key = self._keys.get(key_id)
        return dataclasses.replace(key) if key else None

    async def key_by_digest(self, digest: str) -> ApiKey | None:
        key_id = self._digests.get(digest)
        return await self.key(key_id) if key_id else None

    async def keys(self, account_id: str) -> list[ApiKey]:
        return [
            dataclasses.replace(k)
            for k in sorted(self._keys.values(), key=lambda k: (k.created_at, k.id))
            if k.account_id == account_id
        ]

    async def update_key(self, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        key = self._keys.get(key_id)
        if key is None:
            raise StorageConflict(f"Key {key_id!r} does not exist.")
        _set(key, changes)
        return dataclasses.replace(key)

    # Ledger -----------------------------------------------------------------------

    async def write(
        self, rows: Sequence[LedgerRow], spends: Sequence[Spend], *, again: bool = False
    ) -> None:
        if again and rows and any(_same(row, rows[0]) for row in reversed(self._ledger)):
            return  # written the first time
        for row in rows:
            row = row._replace(seq=len(self._ledger) + 1)
            self._ledger.append(row)
        for spend in spends:
            holder = self._holder(spend.target, spend.target_id)
            if holder is None:
                continue
            holder.spent += spend.amount
            lease = self._leases.get(spend.lease_id) if spend.lease_id else None
            if lease is not None:
                taken = min(spend.amount, lease.amount)
                lease.amount -= taken
                holder.leased -= taken

    async def rows(self, query: LedgerQuery) -> list[LedgerRow]:
        found: list[LedgerRow] = []
        for row in reversed(self._ledger):
            if query.before is not None and (row.seq or 0) >= query.before:
                continue
            if matches(row, query):
                found.append(row)  # rows are tuples: no copy needed
                if len(found) >= query.limit:
                    break
        return found

    async def overview(self, query: LedgerQuery, group_by: str) -> list[Group]:
        groups: dict[str | None, Group] = {}
        for row in self._ledger:
            if row.kind != "request" or not matches(row, query):
                continue
            key = day_of(row.created) if group_by == "day" else getattr(row, group_key(group_by))
            group = groups.setdefault(key, Group(key))
            group.requests += 1
            group.amount += row.amount
            group.prompt_tokens += row.prompt_tokens
            group.completion_tokens += row.completion_tokens
            group.cached_tokens += row.cached_tokens
            group.reasoning_tokens += row.reasoning_tokens
            group.errors += row.status >= 400
        return sorted(groups.values(), key=lambda g: (g.key is None, g.key or ""))

    async def by_request(self, request_id: str, account_id: str) -> LedgerRow | None:
        for row in self._ledger:
            if row.id == request_id and row.account_id == account_id:
                return row
        return None

    # Balances ---------------------------------------------------------------------

    async def credit(self, row: LedgerRow, *, within: str | None = None) -> Account:
        account = self._accounts.get(row.account_id or "")
        if account is None:
            raise StorageConflict(f"Account {row.account_id!r} does not exist.")
        if row.amount < 0 and account.available + row.amount < 0:
            raise StorageConflict("The adjustment would leave a negative balance.")
        if within is not None and row.amount > 0:
            parent = self._accounts.get(within)
            left = 0
            if parent is not None:
                given = sum(
                    max(a.credits - a.spent, 0)
                    for a in self._accounts.values()
                    if a.parent_id == within
                )
                left = parent.budget - parent.spent - given
            if left < row.amount:
                raise parent_short(left)
        account.credits += row.amount
        self._ledger.append(row._replace(seq=len(self._ledger) + 1))
        return dataclasses.replace(account)

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
        holder = self._holder(target, target_id)
        if holder is None:
            return None
        available = _available(holder)
        if available < need:
            return None
        amount = min(want, available)
        holder.leased += amount
        lease = Lease(f"lease_{uuid.uuid4().hex}", target, target_id, owner, amount, expires_at)
        self._leases[lease.id] = lease
        return dataclasses.replace(lease)

    async def renew(self, lease_ids: Sequence[str], expires_at: float) -> set[str]:
        renewed = set()
        for lease_id in lease_ids:
            if lease := self._leases.get(lease_id):
                lease.expires_at = expires_at
                renewed.add(lease_id)
        return renewed

    async def release(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None and (holder := self._holder(lease.target, lease.target_id)):
            holder.leased -= lease.amount

    async def reclaim(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        expired = [lease.id for lease in self._leases.values() if lease.expires_at < now]
        for lease_id in expired:
            await self.release(lease_id)
        return len(expired)

    def _holder(self, target: Target, target_id: str) -> Account | ApiKey | None:
        return (self._accounts if target == "account" else self._keys).get(target_id)


def _available(holder: Account | ApiKey) -> int:
    available = holder.available
    return available if available is not None else 1 << 62


def _set(holder: Account | ApiKey, changes: Mapping[str, Any]) -> None:
    changes = settable(changes)
    if "spend_limit" in changes:
        check_spend_limit(changes["spend_limit"], holder.spent, holder.leased)
    for name, value in changes.items():
        setattr(holder, name, value)


def _same(a: LedgerRow, b: LedgerRow) -> bool:
    return (a.id, a.kind, a.created, a.account_id) == (b.id, b.kind, b.created, b.account_id)
