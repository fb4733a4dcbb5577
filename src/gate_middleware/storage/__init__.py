"""Storage backends, chosen by URL: `memory://`, `sqlite:///gate.db`, `postgresql://...`."""

from __future__ import annotations

from ..errors import ConfigurationError
from .base import (
    Account,
    AccountStore,
    ApiKey,
    BalanceStore,
    Group,
    Lease,
    LedgerQuery,
    LedgerRejected,
    LedgerRow,
    LedgerStore,
    Spend,
    Storage,
    StorageConflict,
    Target,
)

__all__ = [
    "Account",
    "AccountStore",
    "ApiKey",
    "BalanceStore",
    "Group",
    "Lease",
    "LedgerQuery",
    "LedgerRejected",
    "LedgerRow",
    "LedgerStore",
    "Spend",
    "Storage",
    "StorageConflict",
    "Target",
    "storage_from_url",
]


def storage_from_url(url: str) -> Storage:
    """A backend for the URL; its driver is imported here, and only the one needed."""
    scheme = url.partition(":")[0].lower()
    if scheme == "memory":
        from .memory import MemoryStorage

        return MemoryStorage()
    if scheme == "sqlite":
        from .sqlite import SQLiteStorage

        return SQLiteStorage.from_url(url)
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresStorage

        return PostgresStorage(url)
    raise ConfigurationError(
        f"Unknown database URL scheme {scheme!r}: use memory://, sqlite:///path.db "
        "or postgresql://user@host/db."
    )
