"""The SQLite ledger's writer process: rows land once, whatever happens to it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gate_middleware.storage import Account, LedgerRejected, LedgerRow, Spend
from gate_middleware.storage.sqlite import SQLiteStorage

NOW = 1_760_000_000.0


def row(rid: str, amount: int) -> LedgerRow:
    return LedgerRow(id=rid, account_id="a", amount=amount, created=NOW, status=200)


async def opened(path: Path) -> SQLiteStorage:
    storage = SQLiteStorage(path)
    await storage.open()
    await storage.add_account(Account(id="a", name="A", created_at=NOW))
    return storage


def spent_and_rows(path: Path) -> tuple[int, list[str]]:
    with sqlite3.connect(path) as conn:
        spent = conn.execute("SELECT spent FROM accounts WHERE id = 'a'").fetchone()[0]
        ids = [r[0] for r in conn.execute("SELECT id FROM ledger ORDER BY seq")]
    return spent, ids


async def test_the_ledger_is_written_by_a_process_of_its_own(tmp_path: Path) -> None:
    storage = await opened(tmp_path / "gate.db")
    try:
        process = storage._process
        assert process is not None and process.returncode is None
        await storage.write([row("r1", 5), row("r2", 7)], [Spend("account", "a", 12)])
        assert spent_and_rows(tmp_path / "gate.db") == (12, ["r1", "r2"])
    finally:
        await storage.close()
    assert process.returncode == 0  # it ends with its input


async def test_a_dead_writer_process_hands_over_to_a_thread(tmp_path: Path) -> None:
    storage = await opened(tmp_path / "gate.db")
    try:
        await storage.write([row("r1", 5)], [Spend("account", "a", 5)])
        assert storage._process is not None
        storage._process.kill()
        await storage._process.wait()
        await storage.write([row("r2", 7)], [Spend("account", "a", 7)])
        assert storage._process is None
        await storage.write([row("r3", 1)], [Spend("account", "a", 1)])
        assert spent_and_rows(tmp_path / "gate.db") == (13, ["r1", "r2", "r3"])
    finally:
        await storage.close()


async def test_a_batch_committed_before_the_process_died_is_not_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = await opened(tmp_path / "gate.db")
    try:
        process = storage._process
        assert process is not None and process.stdout is not None
        real = process.stdout.readexactly

        async def dies_before_answering(n: int) -> bytes:
            await real(n)  # the transaction is committed...
            process.kill()  # ...and the answer is lost
            raise asyncio.IncompleteReadError(b"", n)

        monkeypatch.setattr(process.stdout, "readexactly", dies_before_answering)
        await storage.write([row("r1", 5)], [Spend("account", "a", 5)])
        assert spent_and_rows(tmp_path / "gate.db") == (5, ["r1"])
        # And one the process never got is written by the thread.
        await storage.write([row("r2", 7)], [Spend("account", "a", 7)])
        assert spent_and_rows(tmp_path / "gate.db") == (12, ["r1", "r2"])
    finally:
        await storage.close()


async def test_a_failing_batch_is_refused_whole_and_the_process_stays(tmp_path: Path) -> None:
    storage = await opened(tmp_path / "gate.db")
    try:
        bad = LedgerRow(id=None, account_id="a", amount=1, created=NOW)  # type: ignore[arg-type]
        with pytest.raises(LedgerRejected, match="NOT NULL"):  # a refusal of the values
            await storage.write([row("r1", 5), bad], [Spend("account", "a", 6)])
        assert spent_and_rows(tmp_path / "gate.db") == (0, [])
        await storage.write([row("r3", 2)], [Spend("account", "a", 2)])
        assert storage._process is not None
        assert spent_and_rows(tmp_path / "gate.db") == (2, ["r3"])
    finally:
        await storage.close()


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_a_flush_cancelled_mid_write_counts_the_batch_once(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gate_middleware.metering import LedgerWriter

    storage = SQLiteStorage(tmp_path / "gate.db", writer_process=writer == "process")
    await storage.open()
    await storage.add_account(Account(id="a", name="A", created_at=NOW))
    try:
        real = storage.write

        async def slow_answer(*args: object, **kw: bool) -> None:
            await real(*args, **kw)  # type: ignore[arg-type]
            await asyncio.sleep(0.2)  # committed; the answer is still on its way

        monkeypatch.setattr(storage, "write", slow_answer)
        ledger = LedgerWriter(storage)
        ledger.add([row(f"r{i}", 1) for i in range(3000)], [Spend("account", "a", 3000)])
        flushing = asyncio.ensure_future(ledger.flush())
        await asyncio.sleep(0.1)
        flushing.cancel()  # a shutdown, say
        with pytest.raises(asyncio.CancelledError):
            await flushing
        await asyncio.sleep(0.5)  # the write finishes on its own
        await ledger.flush()
        spent, ids = spent_and_rows(tmp_path / "gate.db")
        assert (spent, len(ids), len(set(ids))) == (3000, 3000, 3000)
    finally:
        await storage.close()
