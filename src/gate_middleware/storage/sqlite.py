"""SQLite storage: the embedded default (`sqlite:///gate.db`), stdlib `sqlite3`.

One connection in WAL mode, used from worker threads one call at a time (SQLite has
one writer anyway); every write is a `BEGIN IMMEDIATE` transaction, so several
processes may share the file: the others wait on `busy_timeout`. Ledger batches, the
bulk of the writes, go to a writer process of their own (`_sqlite_writer`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread

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
from ._sqlite_writer import REFUSED, Inserts, Statements, connect, execute, frame
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

__all__ = ["SQLiteStorage", "migrate"]

logger = logging.getLogger("gate_middleware.storage")
_WRITER = str(Path(__file__).with_name("_sqlite_writer.py"))

T = TypeVar("T")

_ACCOUNTS = ", ".join(ACCOUNT_COLUMNS)
_KEYS = ", ".join(KEY_COLUMNS)
_LEDGER = ", ".join(LEDGER_COLUMNS)
_ROW_MARKS = f"({', '.join('?' * len(LEDGER_COLUMNS))})"
# Rows per INSERT: one statement step per batch, not per row. The sqlite3 module takes
# the GIL back after every step, and a busy event loop holds it for up to a switch
# interval (5 ms) each time: per-row steps made the writer thread slow and the loop
# slower. 500 rows x 26 columns stays under SQLite's 32,766 variables.
_ROWS_PER_INSERT = 500
_BUDGET = {
    "account": "MIN(credits, COALESCE(spend_limit, credits)) - spent - leased",
    "key": "COALESCE(spend_limit, 4611686018427387904) - spent - leased",
}
_TABLE = {"account": "accounts", "key": "api_keys"}
# What a parent may still give its sub-accounts: its budget, less what it spent and
# what they hold unspent.
_TO_GIVE = """SELECT MIN(credits, COALESCE(spend_limit, credits)) - spent
    - (SELECT COALESCE(SUM(MAX(credits - spent, 0)), 0) FROM accounts WHERE parent_id = ?1)
    FROM accounts WHERE id = ?1"""


@functools.lru_cache(maxsize=32)
def _insert(rows: int) -> str:
    return f"INSERT INTO ledger ({_LEDGER}) VALUES {', '.join([_ROW_MARKS] * rows)}"


def migrate(conn: sqlite3.Connection, steps: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the schema to `len(steps)`; returns the version found before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        found = row[0] if row else 0
        if found > len(steps):
            raise RuntimeError(
                f"The database schema is version {found}, newer than this gate-middleware "
                f"({len(steps)}): upgrade gate-middleware."
            )
        for step in steps[found:]:
            for statement in step:
                conn.execute(statement.format(serial="INTEGER PRIMARY KEY", real="REAL"))
        if row is None:
            conn.execute("INSERT INTO schema_version VALUES (?)", (len(steps),))
        else:
            conn.execute("UPDATE schema_version SET version = ?", (len(steps),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(found)


class SQLiteStorage:
    def __init__(self, path: str | Path, *, writer_process: bool = True) -> None:
        """`writer_process`: ledger batches are written by a process of their own (see
        `_sqlite_writer`), else from a worker thread; an in-memory database has none."""
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._use_process = writer_process and self.path != ":memory:"
        self._process: asyncio.subprocess.Process | None = None
        self._process_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        """`sqlite:///relative.db`, `sqlite:////absolute.db`, `sqlite:///:memory:`;
        `?writer=thread` writes the ledger from a thread instead of a process."""
        location, _, query = url.partition("?")
        writer = dict(parse_qsl(query)).get("writer", "process")
        if writer not in ("process", "thread"):
            raise ConfigurationError(
                f"Unknown SQLite ledger writer {writer!r}: use ?writer=process or ?writer=thread."
            )
        path = location.removeprefix("sqlite://").removeprefix("/") or ":memory:"
        return cls(path, writer_process=writer == "process")

    async def open(self) -> None:
        if self._conn is None:
            self._process_lock = asyncio.Lock()  # opened again, perhaps on another loop
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = await anyio.to_thread.run_sync(connect, self.path)
            await self._run(migrate)
            if self._use_process:
                await self._start_process()

    async def close(self) -> None:
        await self._stop_process()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        if conn is None:
            raise RuntimeError("The storage is not open.")
        return await anyio.to_thread.run_sync(fn, conn, *args, limiter=self._limiter)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._run(lambda conn: conn.execute(sql, args).fetchall())

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(transaction)

    # Accounts and keys ------------------------------------------------------------

    async def add_account(self, account: Account) -> None:
        values = [encode(n, getattr(account, n)) for n in ACCOUNT_COLUMNS]
        sql = f"INSERT INTO accounts ({_ACCOUNTS}) VALUES ({', '.join('?' * len(values))})"
        try:
            await self._write(lambda conn: conn.execute(sql, values))
        except sqlite3.IntegrityError as exc:
            raise StorageConflict(f"Cannot add account {account.id!r}: {exc}.") from None

    async def account(self, account_id: str) -> Account | None:
        rows = await self._fetch(f"SELECT {_ACCOUNTS} FROM accounts WHERE id = ?", account_id)
        return decode_account(rows[0]) if rows else None

    async def chain(self, account_id: str) -> list[Account]:
        columns = ", ".join(f"a.{c}" for c in ACCOUNT_COLUMNS)
        rows = await self._fetch(
            f"""WITH RECURSIVE up(id, depth) AS (
                    SELECT id, 0 FROM accounts WHERE id = ?
                    UNION ALL
                    SELECT a.parent_id, up.depth + 1 FROM accounts a JOIN up ON a.id = up.id
                    WHERE a.parent_id IS NOT NULL)
                SELECT {columns} FROM up JOIN accounts a ON a.id = up.id ORDER BY up.depth DESC""",
            account_id,
        )
        return [decode_account(row) for row in rows]

    async def children(self, parent_id: str | None) -> list[Account]:
        rows = await self._fetch(
            f"SELECT {_ACCOUNTS} FROM accounts WHERE parent_id IS ? ORDER BY created_at, id",
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
        sql = f"INSERT INTO api_keys ({_KEYS}) VALUES ({', '.join('?' * len(values))})"
        try:
            await self._write(lambda conn: conn.execute(sql, values))
        except sqlite3.IntegrityError as exc:
            raise StorageConflict(f"Cannot add the key: {exc}.") from None

    async def key(self, key_id: str) -> ApiKey | None:
        rows = await self._fetch(f"SELECT {_KEYS} FROM api_keys WHERE id = ?", key_id)
        return decode_key(rows[0]) if rows else None

    async def key_by_digest(self, digest: str) -> ApiKey | None:
        rows = await self._fetch(f"SELECT {_KEYS} FROM api_keys WHERE digest = ?", digest)
        return decode_key(rows[0]) if rows else None

    async def keys(self, account_id: str) -> list[ApiKey]:
        rows = await self._fetch(
            f"SELECT {_KEYS} FROM api_keys WHERE account_id = ? ORDER BY created_at, id",
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

        def update(conn: sqlite3.Connection) -> None:
            found = conn.execute(
                f"SELECT spent, leased FROM {table} WHERE id = ?", (row_id,)
            ).fetchone()
            if found is None:
                raise StorageConflict(f"{row_id!r} does not exist.")
            if "spend_limit" in changes:
                check_spend_limit(changes["spend_limit"], *found)
            if changes:
                assignments = ", ".join(f"{name} = ?" for name in changes)
                values = [encode(n, v) for n, v in changes.items()]
                conn.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*values, row_id))

        await self._write(update)

    # Ledger -----------------------------------------------------------------------

    async def write(
        self, rows: Sequence[LedgerRow], spends: Sequence[Spend], *, again: bool = False
    ) -> None:
        values = list(map(ledger_values, rows))
        if again and values:
            committed: bool = await self._run(_has_row, values[0])
            if committed:
                return  # the first time
        inserts = [
            (_insert(len(chunk)), chunk)
            for chunk in (
                values[start : start + _ROWS_PER_INSERT]
                for start in range(0, len(values), _ROWS_PER_INSERT)
            )
        ]
        statements = [statement for spend in spends for statement in _spend_statements(spend)]
        # A batch without rows (a lease going back) goes by the thread: see _in_process.
        if not (values and await self._in_process(inserts, statements, values[0])):
            try:
                await self._run(execute, inserts, statements)
            except REFUSED as exc:
                raise LedgerRejected(f"{type(exc).__name__}: {exc}") from exc

    # The writer process -----------------------------------------------------------

    async def _start_process(self) -> None:
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                _WRITER,
                self.path,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except Exception as exc:  # no executable, or a loop without subprocesses
            logger.warning("No ledger writer process (%s); writing from a thread.", exc)

    async def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()  # the process ends at the end of its input
        try:
            await asyncio.wait_for(process.wait(), 10)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()

    async def _in_process(
        self, inserts: Inserts, statements: Statements, first: Sequence[Any]
    ) -> bool:
        """Run the batch in the writer process; False when there is none (any more).

        A process that dies mid-batch may have committed it or not: the batch's first
        row says which (the batch is one transaction), so a retry never writes twice.
        """
        async with self._process_lock:
            process = self._process
            if process is None:
                return False
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(frame((inserts, statements)))
                await process.stdin.drain()
                head = await process.stdout.readexactly(4)
                answer = pickle.loads(await process.stdout.readexactly(int.from_bytes(head, "big")))
            except (OSError, asyncio.IncompleteReadError):
                logger.error("The ledger writer process ended; writing from a thread.")
                self._process = None
                if process.returncode is None:
                    process.kill()
                await process.wait()
                return await self._run(_has_row, first)
        if answer is not None:
            refused, message = answer
            raise (LedgerRejected if refused else sqlite3.OperationalError)(message)
        return True

    async def rows(self, query: LedgerQuery) -> list[LedgerRow]:
        clause, args = where(query, lambda n: "?")
        found = await self._fetch(
            f"SELECT {_LEDGER}, seq FROM ledger WHERE {clause} ORDER BY seq DESC LIMIT ?",
            *args,
            query.limit,
        )
        return [decode_row(row) for row in found]

    async def overview(self, query: LedgerQuery, group_by: str) -> list[Group]:
        column = group_key(group_by)
        key = "strftime('%Y-%m-%d', created, 'unixepoch')" if group_by == "day" else column
        clause, args = where(query, lambda n: "?")
        found = await self._fetch(
            f"""SELECT {key} AS k, COUNT(*), SUM(amount), SUM(prompt_tokens),
                    SUM(completion_tokens), SUM(cached_tokens), SUM(reasoning_tokens),
                    SUM(status >= 400)
                FROM ledger WHERE {clause} AND kind = 'request'
                GROUP BY k ORDER BY k IS NULL, k""",
            *args,
        )
        return [group(row) for row in found]

    async def by_request(self, request_id: str, account_id: str) -> LedgerRow | None:
        found = await self._fetch(
            f"SELECT {_LEDGER}, seq FROM ledger WHERE id = ? AND account_id = ? "
            "ORDER BY seq LIMIT 1",
            request_id,
            account_id,
        )
        return decode_row(found[0]) if found else None

    # Balances ---------------------------------------------------------------------

    async def credit(self, row: LedgerRow, *, within: str | None = None) -> Account:
        values = tuple(encode(n, getattr(row, n)) for n in LEDGER_COLUMNS)

        def credit(conn: sqlite3.Connection) -> None:
            if within is not None and row.amount > 0:
                found = conn.execute(_TO_GIVE, (within,)).fetchone()
                left = found[0] if found else 0
                if left < row.amount:
                    raise parent_short(left)
            done = conn.execute(
                f"UPDATE accounts SET credits = credits + ? WHERE id = ? "
                f"AND (? >= 0 OR {_BUDGET['account']} + ? >= 0)",
                (row.amount, row.account_id, row.amount, row.amount),
            )
            if done.rowcount != 1:
                exists = conn.execute(
                    "SELECT 1 FROM accounts WHERE id = ?", (row.account_id,)
                ).fetchone()
                raise StorageConflict(
                    "The adjustment would leave a negative balance."
                    if exists
                    else f"Account {row.account_id!r} does not exist."
                )
            conn.execute(_insert(1), values)

        await self._write(credit)
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

        def take(conn: sqlite3.Connection) -> int | None:
            # BEGIN IMMEDIATE holds the write lock, so the amount read here is still
            # true below; the conditional UPDATE is the guard all the same.
            found = conn.execute(
                f"SELECT {available} FROM {table} WHERE id = ?", (target_id,)
            ).fetchone()
            if found is None or found[0] < need:
                return None
            amount = min(want, int(found[0]))
            done = conn.execute(
                f"UPDATE {table} SET leased = leased + ? WHERE id = ? AND {available} >= ?",
                (amount, target_id, amount),
            )
            if done.rowcount != 1:
                return None
            conn.execute(
                "INSERT INTO leases (id, target, target_id, owner, amount, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (lease_id, target, target_id, owner, amount, expires_at),
            )
            return amount

        amount = await self._write(take)
        if amount is None:
            return None
        return Lease(lease_id, target, target_id, owner, amount, expires_at)

    async def renew(self, lease_ids: Sequence[str], expires_at: float) -> set[str]:
        def renew(conn: sqlite3.Connection) -> set[str]:
            return {
                lease_id
                for lease_id in lease_ids
                if conn.execute(
                    "UPDATE leases SET expires_at = ? WHERE id = ?", (expires_at, lease_id)
                ).rowcount
            }

        return await self._write(renew)

    async def release(self, lease_id: str) -> None:
        await self._write(lambda conn: _release(conn, lease_id))

    async def reclaim(self, now: float | None = None) -> int:
        now = time.time() if now is None else now

        def reclaim(conn: sqlite3.Connection) -> int:
            expired = conn.execute("SELECT id FROM leases WHERE expires_at < ?", (now,))
            ids = [row[0] for row in expired.fetchall()]
            for lease_id in ids:
                _release(conn, lease_id)
            return len(ids)

        return await self._write(reclaim)


def _spend_statements(spend: Spend) -> list[tuple[str, Sequence[Any]]]:
    """Spend on the target; the part its lease still covers comes off the lease too."""
    taken = "COALESCE((SELECT MIN(?, amount) FROM leases WHERE id = ?), 0)"
    return [
        (
            f"UPDATE {_TABLE[spend.target]} SET spent = spent + ?, leased = leased - {taken} "
            "WHERE id = ?",
            (spend.amount, spend.amount, spend.lease_id, spend.target_id),
        ),
        (
            "UPDATE leases SET amount = amount - MIN(?, amount) WHERE id = ?",
            (spend.amount, spend.lease_id),
        ),
    ]


def _has_row(conn: sqlite3.Connection, values: Sequence[Any]) -> bool:
    row = dict(zip(LEDGER_COLUMNS, values))
    found = conn.execute(
        "SELECT 1 FROM ledger WHERE id = ? AND kind = ? AND created = ? "
        "AND COALESCE(account_id, '') = ?",
        (row["id"], row["kind"], row["created"], row["account_id"] or ""),
    ).fetchone()
    return found is not None


def _release(conn: sqlite3.Connection, lease_id: str) -> None:
    found = conn.execute(
        "DELETE FROM leases WHERE id = ? RETURNING target, target_id, amount", (lease_id,)
    ).fetchone()
    if found is not None:
        target, target_id, amount = found
        conn.execute(
            f"UPDATE {_TABLE[target]} SET leased = leased - ? WHERE id = ?", (amount, target_id)
        )
