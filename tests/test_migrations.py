"""Starting a new version on an old database upgrades it, keeping the data."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import asyncpg
import pytest

from gate_middleware.storage import LedgerRow
from gate_middleware.storage._common import MIGRATIONS
from gate_middleware.storage.postgres import PostgresStorage
from gate_middleware.storage.postgres import migrate as migrate_postgres
from gate_middleware.storage.sqlite import SQLiteStorage, connect
from gate_middleware.storage.sqlite import migrate as migrate_sqlite

from .conftest import drop_schema


def _estimated_row() -> LedgerRow:
    return LedgerRow(id="r", account_id="old", amount=1, created=1.0, estimated=True)


async def test_an_old_sqlite_database_is_upgraded(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = connect(path)
    assert migrate_sqlite(conn, MIGRATIONS[:1]) == 0
    conn.execute(
        "INSERT INTO accounts (id, name, credits, created_at) VALUES ('old', 'Old', 500, 1)"
    )
    conn.close()

    storage = SQLiteStorage(path)
    await storage.open()
    try:
        old = await storage.account("old")
        assert old is not None and old.credits == 500
        # v2 brought leases and the estimated flag.
        assert await storage.lease("account", "old", need=1, want=100, owner="p", expires_at=9.0)
        await storage.write([_estimated_row()], [])
        row = await storage.by_request("r", "old")
        assert row is not None and row.estimated
    finally:
        await storage.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (len(MIGRATIONS),)
    conn.close()
    # Opening again is a no-op.
    again = SQLiteStorage(path)
    await again.open()
    await again.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "new.db")
    conn = connect(path)
    migrate_sqlite(conn)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await SQLiteStorage(path).open()


@pytest.mark.postgres
async def test_an_old_postgres_database_is_upgraded(postgres_url: str) -> None:
    schema = f"gate_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        assert await migrate_postgres(conn, MIGRATIONS[:1]) == 0
        await conn.execute(
            "INSERT INTO accounts (id, name, credits, created_at) VALUES ('old', 'Old', 500, 1)"
        )
    finally:
        await conn.close()
    storage = PostgresStorage(postgres_url, schema=schema)
    try:
        await storage.open()
        old = await storage.account("old")
        assert old is not None and old.credits == 500
        await storage.write([_estimated_row()], [])
        row = await storage.by_request("r", "old")
        assert row is not None and row.estimated
        await storage.close()
        conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
        try:
            assert await conn.fetchval("SELECT version FROM schema_version") == len(MIGRATIONS)
        finally:
            await conn.close()
    finally:
        await storage.close()
        await drop_schema(postgres_url, schema)
