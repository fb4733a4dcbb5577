"""PostgreSQL storage (asyncpg, the `postgres` extra): for several workers or hosts.

`postgresql://user@host/db?schema=gate` keeps the tables in their own schema. Balance
changes are single conditional UPDATEs under the row's lock; migrations take an
advisory lock, so processes starting together upgrade the schema once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError
from ._common import (
    ACCOUNT_COLUMNS,
    KEY_COLUMNS,
    LEDGER_COLUMNS,
    MIGRATIONS,
    check_spend_limit,
    decode_account,
    decode_key,
    decode_row,
    encode,
    group,
    group_key,
    ledger_values,
    parent_short,
    settable,
    where,
)
from .base import (
    Account,
    ApiKey,
    Group,
    Lease,
    LedgerQuery,
    LedgerRejected,
    LedgerRow,
    Spend,
    StorageConflict,
    Target,
)

__all__ = ["PostgresStorage", "migrate"]

_ACCOUNTS = ", ".join(ACCOUNT_COLUMNS)
_KEYS = ", ".join(KEY_COLUMNS)
_LEDGER = ", ".join(LEDGER_COLUMNS)
_BUDGET = {
    "account": "LEAST(credits, COALESCE(spend_limit, credits)) - spent - leased",
    "key": "COALESCE(spend_limit, 4611686018427387904) - spent - leased",
}
_TABLE = {"account": "accounts", "key": "api_keys"}
# What a parent may still give its sub-accounts: its budget, less what it spent and
# what they hold unspent.
_TO_GIVE = """SELECT LEAST(credits, COALESCE(spend_limit, credits)) - spent
    - (SELECT COALESCE(SUM(GREATEST(credits - spent, 0)), 0)::bigint
       FROM accounts WHERE parent_id = $1)
    FROM accounts WHERE id = $1"""
_LOCK = 0x6761_7465  # advisory lock id for migrations ("gate")
# One spend: spent on its target, and the part its lease still covers off the lease too.
# The lease's row is locked first (FOR UPDATE), so `old.amount` is what is left of it.
_SPEND = """WITH old AS (SELECT id, amount FROM leases WHERE id = $4 FOR UPDATE),
    taken AS (
        UPDATE leases l SET amount = l.amount - LEAST($3, old.amount) FROM old
        WHERE l.id = old.id RETURNING LEAST($3, old.amount) AS amount),
    by_account AS (
        UPDATE accounts SET spent = spent + $3,
            leased = leased - COALESCE((SELECT amount FROM taken), 0)
        WHERE $1 = 'account' AND id = $2)
    UPDATE api_keys SET spent = spent + $3,
        leased = leased - COALESCE((SELECT amount FROM taken), 0)
    WHERE $1 = 'key' AND id = $2"""


def _placeholders(count: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + count))


async def migrate(conn: Any, steps: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the schema to `len(steps)`; returns the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = await conn.fetchval("SELECT version FROM schema_version")
        version = found or 0
        if version > len(steps):
            raise RuntimeError(
                f"The database schema is version {version}, newer than this gate-middleware "
                f"({len(steps)}): upgrade gate-middleware."
            )
        for step in steps[version:]:
            for statement in step:
                await conn.execute(
                    statement.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")
                )
        if found is None:
            await conn.execute("INSERT INTO schema_version VALUES ($1)", len(steps))
        else:
            await conn.execute("UPDATE schema_version SET version = $1", len(steps))
    return int(version)


class PostgresStorage:
    def __init__(self, url: str, *, schema: str | None = None, pool_size: int = 10) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.schema = schema or query.pop("schema", None)
        self._dsn = urlunsplit(parts._replace(query=urlencode(query)))
        self._pool_size = pool_size
        self._pool: Any = None
        # What PostgreSQL (or asyncpg, encoding a value) raises for a value it cannot
        # store: written again, such a batch fails again. Set once asyncpg is imported.
        self._refused: tuple[type[BaseException], ...] = ()

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError:
            raise ConfigurationError(
                "PostgreSQL storage needs asyncpg: pip install 'gate-middleware[postgres]'"
            ) from None
        self._refused = (
            asyncpg.DataError,
            asyncpg.IntegrityConstraintViolationError,
            OverflowError,
            UnicodeError,
        )
        settings = {"search_path": self.schema} if self.schema else {}
        if self.schema:
            conn = await asyncpg.connect(self._dsn)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            finally:
                await conn.close()
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=self._pool_size, server_settings=settings
        )
        async with self._pool.acquire() as conn:
            await migrate(conn)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # Accounts and keys ------------------------------------------------------------

    async def add_account(self, account: Account) -> None:
        values = [encode(n, getattr(account, n)) for n in ACCOUNT_COLUMNS]
        await self._insert("accounts", _ACCOUNTS, values, f"account {account.id!r}")

    async def _insert(self, table: str, columns: str, values: list[Any], what: str) -> None:
        import asyncpg

        try:
            await self._pool.execute(
                f"INSERT INTO {table} ({columns}) VALUES ({_placeholders(len(values))})", *values
            )
        except (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError) as exc:
            raise StorageConflict(f"Cannot add {what}: {exc}.") from None

    async def account(self, account_id: str) -> Account | None:
        row = await self._pool.fetchrow(
            f"SELECT {_ACCOUNTS} FROM accounts WHERE id = $1", account_id
        )
        return decode_account(row) if row else None

    async def chain(self, account_id: str) -> list[Account]:
        columns = ", ".join(f"a.{c}" for c in ACCOUNT_COLUMNS)
        rows = await self._pool.fetch(
            f"""WITH RECURSIVE up(id, depth) AS (
                    SELECT id, 0 FROM accounts WHERE id = $1
                    UNION ALL
                    SELECT a.parent_id, up.depth + 1 FROM accounts a JOIN up ON a.id = up.id
                    WHERE a.parent_id IS NOT NULL)
                SELECT {columns} FROM up JOIN accounts a ON a.id = up.id ORDER BY up.depth DESC""",
            account_id,
        )
        return [decode_account(row) for row in rows]

    async def children(self, parent_id: str | None) -> list[Account]:
        rows = await self._pool.fetch(
            f"SELECT {_ACCOUNTS} FROM accounts WHERE parent_id IS NOT DISTINCT FROM $1 "
            "ORDER BY created_at, id",
            parent_id,
        )
        return [decode_account(row) for row in rows]

    async def update_account(self, account_id: str, changes: Mapping[str, Any]) -> Account:
        await self._update("accounts", account_id, changes)
        account = await self.account(account_id)
        assert account is not None
        return account

    async def add_key(self, key: ApiKey) -> None:
        values = [encode(n, getattr(key, n)) for n in KEY_COLUMNS]
        await self._insert("api_keys", _KEYS, values, "the key")

    async def key(self, key_id: str) -> ApiKey | None:
        row = await self._pool.fetchrow(f"SELECT {_KEYS} FROM api_keys WHERE id = $1", key_id)
        return decode_key(row) if row else None

    async def key_by_digest(self, digest: str) -> ApiKey | None:
        row = await self._pool.fetchrow(f"SELECT {_KEYS} FROM api_keys WHERE digest = $1", digest)
        return decode_key(row) if row else None

    async def keys(self, account_id: str) -> list[ApiKey]:
        rows = await self._pool.fetch(
            f"SELECT {_KEYS} FROM api_keys WHERE account_id = $1 ORDER BY created_at, id",
            account_id,
        )
        return [decode_key(row) for row in rows]

    async def update_key(self, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        await self._update("api_keys", key_id, changes)
        key = await self.key(key_id)
        assert key is not None
        return key

    async def _update(self, table: str, row_id: str, changes: Mapping[str, Any]) -> None:
        changes = settable(changes)
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchrow(
                f"SELECT spent, leased FROM {table} WHERE id = $1 FOR UPDATE", row_id
            )
            if found is None:
                raise StorageConflict(f"{row_id!r} does not exist.")
            if "spend_limit" in changes:
                check_spend_limit(changes["spend_limit"], *found)
            if changes:
                assignments = ", ".join(f"{n} = ${i}" for i, n in enumerate(changes, 2))
                values = [encode(n, v) for n, v in changes.items()]
                await conn.execute(
                    f"UPDATE {table} SET {assignments} WHERE id = $1", row_id, *values
                )

    # Ledger -----------------------------------------------------------------------

    async def write(
        self, rows: Sequence[LedgerRow], spends: Sequence[Spend], *, again: bool = False
    ) -> None:
        records = list(map(ledger_values, rows))
        if again and rows:
            first = rows[0]
            found = await self._pool.fetchval(
                "SELECT 1 FROM ledger WHERE id = $1 AND kind = $2 AND created = $3 "
                "AND account_id IS NOT DISTINCT FROM $4",
                first.id,
                first.kind,
                first.created,
                first.account_id,
            )
            if found:
                return  # committed the first time
        # A fixed order, so two writers never wait on each other's rows in a cycle;
        # executemany sends every spend in one round trip, run in this order.
        ordered = sorted(spends, key=lambda s: (s.target, s.target_id, s.lease_id or ""))
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if records:
                    await conn.copy_records_to_table(
                        "ledger", records=records, columns=LEDGER_COLUMNS, schema_name=self.schema
                    )
                if ordered:
                    await conn.executemany(
                        _SPEND, [(s.target, s.target_id, s.amount, s.lease_id) for s in ordered]
                    )
        except self._refused as exc:
            raise LedgerRejected(f"{type(exc).__name__}: {exc}") from exc

    async def rows(self, query: LedgerQuery) -> list[LedgerRow]:
        clause, args = where(query, lambda n: f"${n}")
        found = await self._pool.fetch(
            f"SELECT {_LEDGER}, seq FROM ledger WHERE {clause} "
            f"ORDER BY seq DESC LIMIT ${len(args) + 1}",
            *args,
            query.limit,
        )
        return [decode_row(row) for row in found]

    async def overview(self, query: LedgerQuery, group_by: str) -> list[Group]:
        column = group_key(group_by)
        key = (
            "to_char(to_timestamp(created) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            if group_by == "day"
            else column
        )
        clause, args = where(query, lambda n: f"${n}")
        found = await self._pool.fetch(
            f"""SELECT {key} AS k, COUNT(*), SUM(amount), SUM(prompt_tokens),
                    SUM(completion_tokens), SUM(cached_tokens), SUM(reasoning_tokens),
                    SUM((status >= 400)::int)
                FROM ledger WHERE {clause} AND kind = 'request'
                GROUP BY 1 ORDER BY 1 NULLS LAST""",
            *args,
        )
        return [group(tuple(row)) for row in found]

    async def by_request(self, request_id: str, account_id: str) -> LedgerRow | None:
        row = await self._pool.fetchrow(
            f"SELECT {_LEDGER}, seq FROM ledger WHERE id = $1 AND account_id = $2 "
            "ORDER BY seq LIMIT 1",
            request_id,
            account_id,
        )
        return decode_row(row) if row else None

    # Balances ---------------------------------------------------------------------

    async def credit(self, row: LedgerRow, *, within: str | None = None) -> Account:
        values = [encode(n, getattr(row, n)) for n in LEDGER_COLUMNS]
        async with self._pool.acquire() as conn, conn.transaction():
            if within is not None and row.amount > 0:
                # The parent's row locked first, so top-ups of its children queue; and
                # read after, in a statement of its own: one that waited for the lock
                # would see the children as they were before the other top-up.
                await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", within)
                left = await conn.fetchval(_TO_GIVE, within) or 0
                if left < row.amount:
                    raise parent_short(left)
            done = await conn.fetchval(
                f"UPDATE accounts SET credits = credits + $1::bigint WHERE id = $2 "
                f"AND ($1::bigint >= 0 OR {_BUDGET['account']} + $1::bigint >= 0) RETURNING 1",
                row.amount,
                row.account_id,
            )
            if done is None:
                exists = await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", row.account_id)
                raise StorageConflict(
                    "The adjustment would leave a negative balance."
                    if exists
                    else f"Account {row.account_id!r} does not exist."
                )
            await conn.execute(
                f"INSERT INTO ledger ({_LEDGER}) VALUES ({_placeholders(len(values))})", *values
            )
        account = await self.account(row.account_id or "")
        assert account is not None
        return account

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
        table, available = _TABLE[target], _BUDGET[target]
        lease_id = f"lease_{uuid.uuid4().hex}"
        async with self._pool.acquire() as conn, conn.transaction():
            # One statement: the row lock makes the check and the take one step.
            amount = await conn.fetchval(
                f"""WITH cur AS (
                        SELECT id, {available} AS free FROM {table} WHERE id = $1 FOR UPDATE)
                    UPDATE {table} t SET leased = t.leased + LEAST($2, cur.free)
                    FROM cur WHERE t.id = cur.id AND cur.free >= $3
                    RETURNING LEAST($2, cur.free)""",
                target_id,
                want,
                need,
            )
            if amount is None:
                return None
            await conn.execute(
                "INSERT INTO leases (id, target, target_id, owner, amount, expires_at) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                lease_id,
                target,
                target_id,
                owner,
                amount,
                expires_at,
            )
        return Lease(lease_id, target, target_id, owner, int(amount), expires_at)

    async def renew(self, lease_ids: Sequence[str], expires_at: float) -> set[str]:
        rows = await self._pool.fetch(
            "UPDATE leases SET expires_at = $1 WHERE id = ANY($2::text[]) RETURNING id",
            expires_at,
            list(lease_ids),
        )
        return {row[0] for row in rows}

    async def release(self, lease_id: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await _release(conn, lease_id)

    async def reclaim(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        async with self._pool.acquire() as conn, conn.transaction():
            ids = [
                row[0]
                for row in await conn.fetch(
                    "SELECT id FROM leases WHERE expires_at < $1 FOR UPDATE SKIP LOCKED", now
                )
            ]
            for lease_id in ids:
                await _release(conn, lease_id)
        return len(ids)


async def _release(conn: Any, lease_id: str) -> None:
    found = await conn.fetchrow(
        "DELETE FROM leases WHERE id = $1 RETURNING target, target_id, amount", lease_id
    )
    if found is not None:
        await conn.execute(
            f"UPDATE {_TABLE[found['target']]} SET leased = leased - $1 WHERE id = $2",
            found["amount"],
            found["target_id"],
        )
