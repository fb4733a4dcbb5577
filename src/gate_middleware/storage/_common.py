"""What the built-in backends share: column lists, row mapping, filters, migrations."""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from .base import Account, ApiKey, Group, LedgerQuery, LedgerRow, StorageConflict

__all__ = [
    "ACCOUNT_COLUMNS",
    "FIELDS_NOT_SETTABLE",
    "GROUPS",
    "KEY_COLUMNS",
    "LEDGER_COLUMNS",
    "MAX_BIGINT",
    "MAX_INTEGER",
    "MAX_TIME",
    "MIGRATIONS",
    "check_spend_limit",
    "day_of",
    "decode_account",
    "decode_key",
    "decode_row",
    "encode",
    "group",
    "group_key",
    "ledger_values",
    "matches",
    "parent_short",
    "settable",
]

# The most every built-in backend holds: PostgreSQL's BIGINT (money, ledger positions)
# and INTEGER (limits), and times that render as dates (the last second of year 9999).
# Input is checked against them, so all backends answer a value too large the same.
MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1
MAX_TIME = 253_402_300_799.0

# Balances change only through credit/lease/write; ids never change.
FIELDS_NOT_SETTABLE = frozenset(
    {
        "id",
        "account_id",
        "parent_id",
        "digest",
        "prefix",
        "credits",
        "spent",
        "leased",
        "created_at",
    }
)
_LIMIT_COLUMNS = (
    "enabled",
    "expires_at",
    "allowed_models",
    "rpm",
    "tpm",
    "rpd",
    "max_concurrency",
    "spend_limit",
    "multiplier",
    "spent",
    "leased",
    "created_at",
)
ACCOUNT_COLUMNS = ("id", "name", "parent_id", "credits", *_LIMIT_COLUMNS)
KEY_COLUMNS = ("id", "account_id", "name", "prefix", "digest", *_LIMIT_COLUMNS)
LEDGER_COLUMNS = LedgerRow._fields[:-1]  # all but `seq`, the database's
# A ledger row's fields are already column values (encode() per field cost ~20 us a row
# on the event loop), and in column order: its values are a slice of it.
ledger_values = operator.itemgetter(slice(None, -1))

# group_by name -> ledger column
GROUPS = {
    "day": "created",
    "model": "model_id",
    "key": "key_prefix",
    "account": "source_account_id",
    "app": "app",
    "route": "route",
}


def group(row: Sequence[Any]) -> Group:
    """An overview row (key, count, amount, tokens..., errors) -> Group."""
    key, *numbers = row
    requests, amount, prompt, completion, cached, reasoning, errors = (int(v or 0) for v in numbers)
    return Group(key, requests, amount, prompt, completion, cached, reasoning, errors)


def group_key(group_by: str) -> str:
    try:
        return GROUPS[group_by]
    except KeyError:
        raise ValueError(f"Cannot group by {group_by!r}; use one of {', '.join(GROUPS)}.") from None


def day_of(created: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(created))


def parent_short(left: int) -> StorageConflict:
    """A parent topping up a child with more than it has left to give."""
    return StorageConflict(
        f"The parent account has {_usd(max(left, 0))} USD left to give: its "
        "balance less what its sub-accounts hold unspent."
    )


def check_spend_limit(limit: int | None, spent: int, leased: int) -> None:
    """A limit below `spent + leased` would let the leases spend past it."""
    if limit is None or limit >= spent + leased:
        return
    message = f"The spend limit would be below what is already spent ({_usd(spent)} USD)"
    if leased:
        message += (
            f" plus what gateway processes hold to spend ({_usd(leased)} USD); a process "
            "gives back what it holds unused within about a third of the lease time "
            "(GATE_QUOTA_LEASE_SECONDS) of its last request"
        )
    raise StorageConflict(message + ".")


def _usd(nanos: int) -> str:
    return f"{Decimal(nanos) / 10**9:f}"


def settable(changes: Mapping[str, Any]) -> dict[str, Any]:
    bad = set(changes) & FIELDS_NOT_SETTABLE
    if bad:
        raise StorageConflict(f"Cannot set {', '.join(sorted(bad))} directly.")
    return dict(changes)


def encode(name: str, value: Any) -> Any:
    """Python value -> column value (the same for SQLite and PostgreSQL)."""
    if name == "allowed_models":
        return None if value is None else json.dumps(list(value))
    if name == "multiplier":
        return str(value)
    if name in ("enabled", "stream", "estimated"):
        return bool(value)
    return value


def _decode(name: str, value: Any) -> Any:
    if name == "allowed_models":
        return None if value is None else tuple(json.loads(value))
    if name == "multiplier":
        return Decimal(value)
    if name in ("enabled", "stream", "estimated"):
        return bool(value)
    return value


def decode_account(row: Sequence[Any]) -> Account:
    return Account(**{n: _decode(n, v) for n, v in zip(ACCOUNT_COLUMNS, row)})


def decode_key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(**{n: _decode(n, v) for n, v in zip(KEY_COLUMNS, row)})


def decode_row(row: Sequence[Any]) -> LedgerRow:
    names = (*LEDGER_COLUMNS, "seq")
    return LedgerRow(**{n: _decode(n, v) for n, v in zip(names, row)})


def matches(row: LedgerRow, query: LedgerQuery) -> bool:
    return (
        row.account_id == query.account_id
        and (query.start is None or row.created >= query.start)
        and (query.end is None or row.created < query.end)
        and (query.model is None or query.model in (row.model, row.model_id))
        and (query.key_id is None or row.key_id == query.key_id)
        and (query.source_account_id is None or row.source_account_id == query.source_account_id)
        and (query.status is None or row.status == query.status)
        and (query.kind is None or row.kind == query.kind)
    )


def where(query: LedgerQuery, mark: Any) -> tuple[str, list[Any]]:
    """The WHERE clause for a ledger query; `mark(n)` renders the n-th placeholder."""
    clauses, args = ["account_id = " + mark(1)], [query.account_id]

    def add(sql: str, value: Any) -> None:
        args.append(value)
        clauses.append(sql.replace("?", mark(len(args))))

    if query.start is not None:
        add("created >= ?", query.start)
    if query.end is not None:
        add("created < ?", query.end)
    if query.model is not None:
        args.extend((query.model, query.model))
        clauses.append(f"(model = {mark(len(args) - 1)} OR model_id = {mark(len(args))})")
    if query.key_id is not None:
        add("key_id = ?", query.key_id)
    if query.source_account_id is not None:
        add("source_account_id = ?", query.source_account_id)
    if query.status is not None:
        add("status = ?", query.status)
    if query.kind is not None:
        add("kind = ?", query.kind)
    if query.before is not None:
        add("seq < ?", query.before)
    return " AND ".join(clauses), args


# Versioned schema: each entry upgrades version n-1 to n. `{serial}` and `{real}` are
# filled per dialect. Never edit a released step: add a new one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            parent_id TEXT REFERENCES accounts(id),
            credits BIGINT NOT NULL DEFAULT 0,
            enabled BOOLEAN NOT NULL DEFAULT TRUE,
            expires_at {real},
            allowed_models TEXT,
            rpm INTEGER, tpm INTEGER, rpd INTEGER, max_concurrency INTEGER,
            spend_limit BIGINT,
            multiplier TEXT NOT NULL DEFAULT '1',
            spent BIGINT NOT NULL DEFAULT 0,
            leased BIGINT NOT NULL DEFAULT 0,
            created_at {real} NOT NULL
        )""",
        "CREATE INDEX accounts_parent ON accounts(parent_id)",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,
            enabled BOOLEAN NOT NULL DEFAULT TRUE,
            expires_at {real},
            allowed_models TEXT,
            rpm INTEGER, tpm INTEGER, rpd INTEGER, max_concurrency INTEGER,
            spend_limit BIGINT,
            multiplier TEXT NOT NULL DEFAULT '1',
            spent BIGINT NOT NULL DEFAULT 0,
            leased BIGINT NOT NULL DEFAULT 0,
            created_at {real} NOT NULL
        )""",
        "CREATE INDEX api_keys_account ON api_keys(account_id)",
        """CREATE TABLE ledger (
            seq {serial},
            id TEXT NOT NULL,
            account_id TEXT,
            kind TEXT NOT NULL,
            created {real} NOT NULL,
            amount BIGINT NOT NULL,
            source_account_id TEXT,
            key_id TEXT,
            key_prefix TEXT,
            model TEXT, model_id TEXT, provider TEXT, upstream_model TEXT,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            latency_ms {real}, ttft_ms {real},
            status INTEGER NOT NULL DEFAULT 0,
            error_code TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            app TEXT,
            stream BOOLEAN NOT NULL DEFAULT FALSE,
            actor TEXT,
            note TEXT
        )""",
        "CREATE INDEX ledger_account_seq ON ledger(account_id, seq)",
        "CREATE INDEX ledger_request ON ledger(id)",
    ],
    [
        # v2: balance leases (quota.py) and the "estimated usage" flag.
        """CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            target_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            amount BIGINT NOT NULL,
            expires_at {real} NOT NULL
        )""",
        "CREATE INDEX leases_expiry ON leases(expires_at)",
        "ALTER TABLE ledger ADD COLUMN estimated BOOLEAN NOT NULL DEFAULT FALSE",
    ],
    [
        # v3: the host route that made a call through GateMiddleware, and its request id.
        "ALTER TABLE ledger ADD COLUMN route TEXT",
        "ALTER TABLE ledger ADD COLUMN parent_id TEXT",
    ],
]
